"""Planned maintenance of a storage node (pure): which of its legs a dom0 still holds.

Draining a storage node takes its legs out of the arrays before their exports go: the dom0s'
work flags those legs ``leaving`` and each dom0 drops the leg from its md array on purpose (so
a writer sees no stall), and reports it ``missing``. A drained node keeps exporting a leg only
while some dom0 attached to the volume still holds it; once none does, the export leaves the
node's work, and when no leg of the node is held any more it can be powered off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from configserver.cloud.model import Leg, Volume
from configserver.model import Node

# The states of a leg in a dom0's array (its report) in which the dom0 still holds it.
HOLDING = frozenset({"active", "rebuilding"})


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


__all__ = ["HOLDING", "drain_status", "holds", "legs_held"]
