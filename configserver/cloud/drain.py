"""Planned maintenance (pure): which legs of a drained storage node a dom0 still holds, and
which instances a drained dom0 moves away next.

Draining a storage node takes its legs out of the arrays before their exports go: the dom0s'
work flags those legs ``leaving`` and each dom0 drops the leg from its md array on purpose (so
a writer sees no stall), and reports it ``missing``. A drained node keeps exporting a leg only
while some dom0 attached to the volume still holds it; once none does, the export leaves the
node's work, and when no leg of the node is held any more it can be powered off.

Draining a dom0 live-migrates every instance whose claim it holds to other dom0s, at most
``parallel`` at a time (the scheduler picks each target; a drained dom0 is never one). An
instance that cannot move yet (not running yet, no room elsewhere) is retried at each report;
one whose migration failed ``TRIES`` times in this drain is left where it runs and named in
the drain's status. The dom0 is drained once it holds no claim: safe to power off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from configserver.cloud.instances import Instance
from configserver.cloud.model import Leg, Volume
from configserver.errors import InvalidRequest
from configserver.model import Node

# The states of a leg in a dom0's array (its report) in which the dom0 still holds it.
HOLDING = frozenset({"active", "rebuilding"})
DEFAULT_PARALLEL = 2  # live migrations at once out of a draining dom0
MAX_PARALLEL = 16
TRIES = 2  # failed migrations of one instance before its dom0's drain leaves it there


def holds(volume: Volume, leg: Leg) -> bool:
    """Whether a dom0 attached to ``volume`` (or still detaching) holds ``leg``: its latest
    report lists the leg active or rebuilding, or it has not reported the volume yet."""
    if not volume.attachments:
        return False
    if leg.member in HOLDING:
        return True
    return leg.member is None and any(a.state == "requested" for a in volume.attachments)


def legs_held(volumes: Sequence[Volume], mac: str) -> int:
    """How many legs on storage node ``mac`` some dom0 still holds (0: safe to power off)."""
    return sum(1 for volume in volumes for leg in volume.legs
               if leg.node == mac and holds(volume, leg))


def drain_status(node: Node, volumes: Sequence[Volume]) -> dict[str, Any] | None:
    """``{"requested", "legs_held"}`` of a drained storage node; None for any other."""
    if node.role != "storage" or node.drained is None:
        return None
    return {"requested": node.drained, "legs_held": legs_held(volumes, node.mac)}


def parallel(value: object) -> int:
    """A drain's limit of migrations at once, from a request (None: the default)."""
    if value is None:
        return DEFAULT_PARALLEL
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PARALLEL:
        raise InvalidRequest(f"parallel must be an integer from 1 to {MAX_PARALLEL}, "
                             f"not {value!r:.40}")
    return value


def held_by(instances: Sequence[Instance], mac: str) -> list[Instance]:
    """The instances dom0 ``mac`` holds the claim of (a drain waits for all to leave)."""
    return [i for i in instances if i.claim is not None and i.claim.node == mac]


def leaving(instances: Sequence[Instance], mac: str) -> list[Instance]:
    """Those of them on their way to another dom0 now."""
    return [i for i in held_by(instances, mac)
            if i.migration is not None and i.migration.source == mac]


def next_moves(instances: Sequence[Instance], mac: str, limit: int,
               failures: dict[str, int]) -> list[Instance]:
    """Which instances draining dom0 ``mac`` sends away now: those it holds that are not
    moving and have failed fewer than ``TRIES`` times (``failures`` by id), by name, up to
    ``limit`` migrations at once."""
    room = limit - len(leaving(instances, mac))
    waiting = [i for i in held_by(instances, mac)
               if i.migration is None and failures.get(i.id, 0) < TRIES]
    return sorted(waiting, key=lambda i: i.name)[:max(0, room)]


def dom0_drain_status(node: Node, instances: Sequence[Instance], limit: int,
                      stuck: dict[str, tuple[str, bool]]) -> dict[str, Any] | None:
    """``{"requested", "parallel", "instances_left", "moving", "stuck"}`` of a drained dom0
    (``stuck``: instance name -> why it does not move now, and whether the drain gave it up
    after ``TRIES`` failed migrations); None for any other node."""
    if node.role != "dom0" or node.drained is None:
        return None
    there = held_by(instances, node.mac)
    return {"requested": node.drained, "parallel": limit, "instances_left": len(there),
            "moving": sorted(i.name for i in leaving(instances, node.mac)),
            "stuck": [{"instance": name, "reason": stuck[name][0], "given_up": stuck[name][1]}
                      for name in sorted(stuck)]}


__all__ = ["DEFAULT_PARALLEL", "HOLDING", "MAX_PARALLEL", "TRIES", "dom0_drain_status",
           "drain_status", "held_by", "holds", "leaving", "legs_held", "next_moves",
           "parallel"]
