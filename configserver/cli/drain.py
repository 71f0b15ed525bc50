"""``configserver node drain|undrain NODE``: planned maintenance of a node.

One API call each (``POST /api/v1/nodes/{node}/drain``); ``drain --wait`` then polls the node
(``GET /api/v1/nodes/{mac}``) until no dom0 holds a leg of a storage node any more, or a dom0
holds no instance (they migrate away live, ``--parallel`` at a time), showing what is left on
a terminal (``StatusLine``; quiet elsewhere). ``--json`` prints the node's JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from configserver.cli.format import StatusLine, printable
from configserver.cloud.drain import DEFAULT_PARALLEL, MAX_PARALLEL, TRIES
from configserver.errors import Conflict, WaitTimeout
from configserver.http.client import ApiClient

DEFAULT_WAIT = 600.0  # seconds, for a bare --wait
POLL = 1.0


def add_parsers(nsub: Any, common: argparse.ArgumentParser,
                duration: Callable[[str], float]) -> None:
    drain = nsub.add_parser("drain", parents=[common],
                            help="planned maintenance: a storage node's legs leave the "
                                 "arrays, then its exports; a dom0's instances migrate away "
                                 "live; nothing new goes there until undrain")
    drain.add_argument("node", help="hostname or MAC")
    drain.add_argument("--parallel", type=int, metavar="N",
                       help=f"a dom0's live migrations at once (1-{MAX_PARALLEL}, default "
                            f"{DEFAULT_PARALLEL}; again on a drained dom0 changes it)")
    drain.add_argument("--wait", nargs="?", type=duration, const=DEFAULT_WAIT, default=None,
                       metavar="SECONDS",
                       help="wait until no dom0 holds a leg there, or no instance is left "
                            f"on a dom0 (default {DEFAULT_WAIT:.0f}s), then say it is safe "
                            "to power off")
    undrain = nsub.add_parser("undrain", parents=[common],
                              help="bring a drained node back (its legs resync by bitmap)")
    undrain.add_argument("node", help="hostname or MAC")


def _path(ref: str, rest: str = "") -> str:
    return f"/api/v1/nodes/{urllib.parse.quote(ref, safe='')}{rest}"


def _left(drain: dict[str, Any]) -> int:
    """What a drain still waits for: legs held, or instances still on the dom0."""
    return int(drain.get("legs_held", drain.get("instances_left", 0)))


def _dom0_line(label: str, drain: dict[str, Any]) -> str:
    left = drain["instances_left"]
    if left == 0:
        return f"{label} drained: no instance left, safe to power off"
    text = f"draining {label}: {left} instance{'s' if left != 1 else ''} left"
    if drain["moving"]:
        text += f", moving {', '.join(drain['moving'])}"
    for item in drain["stuck"]:
        text += f"; {item['instance']}: {item['reason']}"
    return text


def drain_line(node: dict[str, Any]) -> str:
    """What ``node drain`` says: the legs still held or instances left, or that the node may
    be powered off."""
    label = node.get("hostname") or node["mac"]
    drain = node.get("drain")
    if drain is None:
        return f"{label} drained: it takes no new volume"
    if "instances_left" in drain:
        return _dom0_line(label, drain)
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
        said = ("instances may be placed there again" if node.get("role") == "dom0" else
                "its legs come back (the dom0s resync only what changed)")
        return _print(args, node, f"{label} undrained: {said}")
    parallel = getattr(args, "parallel", None)
    node = client.post(_path(args.node, "/drain"),
                       {} if parallel is None else {"parallel": parallel})
    if args.wait is not None:
        status = status or StatusLine()
        started = clock()
        deadline = started + args.wait
        try:
            while _left(node.get("drain") or {}) > 0:
                status.show(f"{drain_line(node)} ({clock() - started:.0f}s)")
                _given_up(node)
                if clock() >= deadline:
                    raise WaitTimeout(f"{drain_line(node)} after {args.wait:.0f}s",
                                      hint="see 'configserver volume list' and 'configserver "
                                           "instance list'; a dom0 that does not let go can "
                                           "have its volume detached")
                sleep(min(POLL, max(0.0, deadline - clock())))
                node = client.get(_path(node["mac"]))
        finally:
            status.close()
    return _print(args, node, drain_line(node))


def _given_up(node: dict[str, Any]) -> None:
    """Fail the wait once every instance left on a draining dom0 failed to move ``TRIES``
    times: nothing more happens by itself (a refusal, such as no room, may still clear)."""
    drain = node.get("drain") or {}
    stuck = drain.get("stuck") or []
    failed = [s for s in stuck if s.get("given_up")]
    if drain.get("instances_left") and not drain.get("moving") \
            and len(failed) == drain["instances_left"]:
        label = node.get("hostname") or node["mac"]
        raise Conflict(drain_line(node), hint=f"each failed to migrate {TRIES} times: see "
                       f"'configserver instance show {failed[0]['instance']}'; "
                       f"'configserver node undrain {label}' then 'node drain {label}' "
                       "tries again, as does 'configserver instance migrate'")


__all__ = ["add_parsers", "cmd_drain", "drain_line"]
