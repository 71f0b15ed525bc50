"""``configserver node drain|undrain NODE``: planned maintenance of a node.

One API call each (``POST /api/v1/nodes/{node}/drain``); ``drain --wait`` then polls the node
(``GET /api/v1/nodes/{mac}``) until no dom0 holds a leg of it any more, showing how many on a
terminal (``StatusLine``; quiet elsewhere). ``--json`` prints the node's JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from configserver.cli.format import StatusLine, printable
from configserver.errors import WaitTimeout
from configserver.http.client import ApiClient

DEFAULT_WAIT = 600.0  # seconds, for a bare --wait
POLL = 1.0


def add_parsers(nsub: Any, common: argparse.ArgumentParser,
                duration: Callable[[str], float]) -> None:
    drain = nsub.add_parser("drain", parents=[common],
                            help="planned maintenance: a storage node's legs leave the "
                                 "arrays, then its exports; a dom0 takes no new volume")
    drain.add_argument("node", help="hostname or MAC")
    drain.add_argument("--wait", nargs="?", type=duration, const=DEFAULT_WAIT, default=None,
                       metavar="SECONDS",
                       help="wait until no dom0 holds a leg there (default "
                            f"{DEFAULT_WAIT:.0f}s), then say it is safe to power off")
    undrain = nsub.add_parser("undrain", parents=[common],
                              help="bring a drained node back (its legs resync by bitmap)")
    undrain.add_argument("node", help="hostname or MAC")


def _path(ref: str, rest: str = "") -> str:
    return f"/api/v1/nodes/{urllib.parse.quote(ref, safe='')}{rest}"


def drain_line(node: dict[str, Any]) -> str:
    """What ``node drain`` says: the legs still held, or that the node may be powered off."""
    label = node.get("hostname") or node["mac"]
    drain = node.get("drain")
    if drain is None:
        return f"{label} drained: it takes no new volume"
    held = drain["legs_held"]
    if held == 0:
        return f"{label} drained: safe to power off"
    legs = "1 leg" if held == 1 else f"{held} legs"
    return f"draining {label}: {legs} still held by dom0s"


def _print(args: argparse.Namespace, node: dict[str, Any], text: str) -> int:
    if getattr(args, "json", False):
        print(json.dumps(node, indent=2, sort_keys=True, ensure_ascii=True))
    else:
        print(printable(text))
    return 0


def cmd_drain(args: argparse.Namespace, client: ApiClient, *,
              clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep,
              status: StatusLine | None = None) -> int:
    if args.action == "undrain":
        node = client.post(_path(args.node, "/undrain"), {})
        label = node.get("hostname") or node["mac"]
        return _print(args, node, f"{label} undrained: its legs come back (the dom0s resync "
                                  "only what changed)")
    node = client.post(_path(args.node, "/drain"), {})
    if args.wait is not None:
        status = status or StatusLine()
        started = clock()
        deadline = started + args.wait
        try:
            while (node.get("drain") or {}).get("legs_held", 0) > 0:
                status.show(f"{drain_line(node)} ({clock() - started:.0f}s)")
                if clock() >= deadline:
                    raise WaitTimeout(f"{drain_line(node)} after {args.wait:.0f}s",
                                      hint="see 'configserver volume list'; a dom0 that does "
                                           "not let go can have its volume detached")
                sleep(min(POLL, max(0.0, deadline - clock())))
                node = client.get(_path(node["mac"]))
        finally:
            status.close()
    return _print(args, node, drain_line(node))


__all__ = ["add_parsers", "cmd_drain", "drain_line"]
