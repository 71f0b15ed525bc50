"""``configserver farm up|status|down`` (also ``python -m configserver.farm``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from configserver.errors import NetbootError
from configserver.farm import FarmError, dashboard
from configserver.farm.console import attach
from configserver.farm.farm import Farm, FarmConfig, format_table, plan_nodes

FIRMWARES = ("bios", "uefi", "uefi-pxe")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="configserver farm",
                                     description="QEMU test farm: PXE-boot a small cluster")
    parser.add_argument("--farm-dir", type=Path,
                        default=Path(os.environ.get("FARM_DIR", "build/farm")),
                        help="where the farm keeps its state and logs (default build/farm)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the network, start the server and boot the VMs")
    up.add_argument("--dom0", type=int, default=None, help="Xen dom0 nodes (default 1)")
    up.add_argument("--storage", type=int, default=None, help="storage nodes (default 1)")
    up.add_argument("--cloud", action="store_true",
                    help="the cloud preset: 2 dom0 and 2 storage nodes (every volume lives on "
                         "two storage nodes; a second dom0 to move it to)")
    up.add_argument("--firmware", default="bios",
                    help="bios, uefi or uefi-pxe; a comma list is cycled over the nodes")
    up.add_argument("--images", type=Path, default=Path("build/images"),
                    help="images directory (default build/images)")
    up.add_argument("--subnet", default="198.18.0.0/24", help="inside 198.18.0.0/15")
    up.add_argument("--http-port", type=int, default=8080)
    up.add_argument("--timeout", type=float, default=1200, help="seconds until all are ready")
    up.add_argument("--no-wait", action="store_true", help="return once the VMs are started")
    up.add_argument("--json", action="store_true")
    up.add_argument("--fresh", action="store_true",
                    help="start from an empty registry (default: keep the last farm's state)")
    up.add_argument("--ssh-key", type=Path, action="append", default=[], metavar="FILE",
                    help="a public key file for root on every node (repeatable); the farm's "
                         "own key (used by 'ssh') is always there")
    st = sub.add_parser("status", help="the farm's nodes and their states")
    st.add_argument("--json", action="store_true")
    sub.add_parser("down", help="stop everything and remove the namespace")
    cpu = sub.add_parser("cpu", help="each VM's CPU use (share of a core) over some seconds")
    cpu.add_argument("--seconds", type=float, default=30.0)
    cpu.add_argument("--json", action="store_true")
    con = sub.add_parser("console", help="attach to a VM's serial console (Ctrl-] detaches; "
                                         "the VM runs on)")
    con.add_argument("node", help="node name, e.g. dom0-1")
    ssh = sub.add_parser("ssh", help="ssh into a farm node as root (from the farm's namespace)")
    ssh.add_argument("node", help="node name, e.g. dom0-1")
    ssh.add_argument("remote", nargs=argparse.REMAINDER, help="command to run there")
    dash = sub.add_parser("dashboard", help="forward the server's dashboard to "
                                            "https://127.0.0.1:PORT and print a login link")
    dash.add_argument("--port", type=int, default=8443, help="on this host's loopback")
    off = sub.add_parser("power-off", help="pull the plug on one VM (SIGKILL; disks stay)")
    off.add_argument("node")
    on = sub.add_parser("power-on", help="boot one VM again (same MAC, tap and disks)")
    on.add_argument("node")
    on.add_argument("--no-wait", action="store_true", help="return once the VM is started")
    on.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        print("configserver farm: error: needs root (network namespaces, taps)",
              file=sys.stderr)
        return 1
    try:
        return _run(args)
    except NetbootError as exc:  # FarmError, and the config server's own errors
        print(exc.one_line("configserver farm"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "up":
        firmware = [f.strip() for f in args.firmware.split(",") if f.strip()]
        bad = [f for f in firmware if f not in FIRMWARES]
        if bad or not firmware:
            raise FarmError(f"unknown firmware {','.join(bad) or '(none)'}",
                            hint=f"choose from {', '.join(FIRMWARES)}")
        preset = 2 if args.cloud else 1
        nodes = plan_nodes(preset if args.dom0 is None else args.dom0,
                           preset if args.storage is None else args.storage, firmware,
                           args.subnet)
        config = FarmConfig(farm_dir=args.farm_dir, nodes=nodes, images_dir=args.images,
                            subnet=args.subnet, http_port=args.http_port,
                            ready_timeout=args.timeout, fresh=args.fresh,
                            ssh_keys=tuple(_read_key(path) for path in args.ssh_key))
        rows = Farm(config).up(wait=not args.no_wait)
        return _show(rows, args.json)
    farm = Farm(FarmConfig(farm_dir=args.farm_dir, nodes=(), images_dir=Path("build/images")))
    if args.command == "status":
        return _show(farm.status(), args.json)
    if args.command == "cpu":
        rows = farm.cpu(args.seconds)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                share = row["cpu_share"]
                print(f"{row['name']:<12} {row['role']:<8} "
                      + (f"{share * 100:5.1f}% of a core" if share is not None else "stopped")
                      + f" over {row['seconds']:.0f}s")
        return 0
    if args.command == "power-off":
        farm.power_off(args.node)
        return 0
    if args.command == "power-on":
        return _show(farm.power_on(args.node, wait=not args.no_wait), args.json)
    if args.command == "console":
        return attach(farm.console_socket(args.node), args.node)
    if args.command == "dashboard":
        return dashboard.serve(farm, args.port)
    if args.command == "ssh":
        argv = farm.ssh_command(args.node, args.remote)
        os.execvp(argv[0], argv)
    removed = farm.down()
    print("removed: " + (", ".join(removed) if removed else "nothing (no farm was up)"))
    return 0


def _read_key(path: Path) -> str:
    try:
        return path.expanduser().read_text()
    except OSError as exc:
        raise FarmError(f"cannot read SSH key {path}: {exc.strerror}") from None


def _show(rows: list[dict], as_json: bool) -> int:
    print(json.dumps(rows, indent=2) if as_json else format_table(rows))
    return 0
