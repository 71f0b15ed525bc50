"""The ``nodeagent`` command: the only place that reads argv, files and the environment.

    nodeagent run [--server URL] [--mac MAC]... [--boot-id ID] [--config FILE] ...
    nodeagent inventory --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from nodeagent import __version__
from nodeagent.config import (
    BOOT_ID_FILE,
    DEFAULT_CONFIG_FILE,
    AgentConfig,
    build_config,
    parse_kernel_cmdline,
)
from nodeagent.errors import AgentError, ConfigError

log = logging.getLogger("nodeagent")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodeagent", description="netboot node agent")
    parser.add_argument("--version", action="version", version=f"nodeagent {__version__}")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the agent (lookup, heartbeats, local API)")
    run.add_argument("--config", type=Path, help=f"TOML file (default {DEFAULT_CONFIG_FILE})")
    run.add_argument("--cmdline", type=Path, default=Path("/proc/cmdline"),
                     help="kernel command line to read (default /proc/cmdline)")
    run.add_argument("--server", help="config server URL (netboot.server=)")
    run.add_argument("--mac", action="append", dest="macs",
                     help="MAC to look up with instead of the machine's (repeatable)")
    run.add_argument("--boot-id", help=f"per-boot identifier (default {BOOT_ID_FILE})")
    run.add_argument("--boot-ticket", help="this boot's ticket (netboot.ticket=)")
    run.add_argument("--state-dir", type=Path, help="where the token is kept (/run/nodeagent)")
    run.add_argument("--api-listen",
                     help="local API address (every one with HTTPS, 127.0.0.1 with HTTP)")
    run.add_argument("--api-port", type=int, help="local API port (9898; 0 disables it)")
    run.add_argument("--inventory-file", type=Path,
                     help="push this recorded inventory instead of collecting one")
    run.add_argument("--no-watch", dest="watch", action="store_false", default=None,
                     help="do not watch udev/netlink for changes")

    inventory = commands.add_parser("inventory", help="print this machine's inventory")
    inventory.add_argument("--json", action="store_true", help="JSON output (the default)")
    return parser


def _read_optional(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def load_config(args: argparse.Namespace, environ: dict[str, str]) -> AgentConfig:
    kernel = parse_kernel_cmdline(_read_optional(args.cmdline) or "")
    file_settings: dict[str, Any] = {}
    config_path = args.config or DEFAULT_CONFIG_FILE
    text = _read_optional(config_path)
    if text is None and args.config is not None:
        raise ConfigError(f"cannot read {config_path}")
    if text is not None:
        try:
            file_settings = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: {exc}") from None
    boot_id = None if args.boot_id else (_read_optional(BOOT_ID_FILE) or "").strip() or None
    flags = {"server": args.server, "macs": args.macs, "boot_id": args.boot_id,
             "boot_ticket": args.boot_ticket, "state_dir": args.state_dir,
             "api_listen": args.api_listen,
             "api_port": args.api_port, "inventory_file": args.inventory_file,
             "watch": args.watch, "notify_socket": environ.get("NOTIFY_SOCKET")}
    return build_config({"boot_id": boot_id}, kernel, file_settings, flags)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "inventory":
            from nodeagent.inventory import collect

            json.dump(collect(), sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
            return 0
        config = load_config(args, dict(os.environ))
        from nodeagent.daemon import run_agent

        asyncio.run(run_agent(config))
        return 0
    except AgentError as exc:
        hint = f" (hint: {exc.hint})" if exc.hint else ""
        print(f"nodeagent: {exc.message}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
