"""A standalone TFTP server on the library's defaults, for the netns tests and the benchmark.

    python -m configserver.tftp --root DIR [--root images/=DIR] [--root NAME=FILE]
        [--address IP] [--port N]
        [--interface IF] [--lease IP=MAC ...] [--set NAME=VALUE ...]

It prints ``READY host:port`` once it listens, one JSON line per boot event (for the leases
given), and serves until SIGTERM or SIGINT. ``configserver serve`` is the product's way in.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path

from configserver import eventloop
from configserver.config import ServerConfig, TftpConfig, from_mapping
from configserver.eventloop import PollingSelector
from configserver.tftp.service import start_tftp


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m configserver.tftp")
    parser.add_argument("--root", action="append", required=True,
                        help="DIR, or PREFIX/=DIR to serve DIR under a name prefix, or "
                             "NAME=FILE to serve one file under an exact name")
    parser.add_argument("--address", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=69)
    parser.add_argument("--interface")
    parser.add_argument("--lease", action="append", default=[], help="IP=MAC")
    parser.add_argument("--set", action="append", default=[],
                        help="a TftpConfig setting, NAME=VALUE")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


def _config(args: argparse.Namespace) -> ServerConfig:
    tftp: dict[str, object] = {"bind_address": args.address, "port": args.port}
    known = {f.name for f in dataclasses.fields(TftpConfig)}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in known:
            raise SystemExit(f"unknown TFTP setting {name!r}; known: {', '.join(sorted(known))}")
        tftp[name] = value
    return from_mapping({"interface": args.interface, "tftp": tftp})


async def _serve(args: argparse.Namespace, selector: PollingSelector) -> None:
    roots: dict[str, Path] = {}
    for item in args.root:
        prefix, sep, directory = item.rpartition("=")
        roots[prefix if sep else ""] = Path(directory)
    leases = dict(item.split("=", 1) for item in args.lease)

    def record_event(mac: str, kind: str, details: dict) -> None:
        print(json.dumps({"mac": mac, "kind": kind, **details}), flush=True)

    service = await start_tftp(_config(args), roots, resolve_mac=leases.get,
                               record_event=record_event, expect_event=selector.expect)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    assert service.listener is not None
    host, port = service.listener.address
    print(f"READY {host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await service.close()
        logging.getLogger(__name__).info("%s", selector.summary())


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    eventloop.run(lambda selector: _serve(args, selector))
    return 0


if __name__ == "__main__":
    sys.exit(main())
