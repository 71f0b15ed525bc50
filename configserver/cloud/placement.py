"""Where a new volume's two legs go (pure): the two ready storage nodes with most room
(never a drained one).

A storage node's room is what its agent last reported (``storage.vg.free`` once it has the
volume group, else the sum of its empty disks), minus the legs already placed on it that the
report does not count yet (not exported there). Ties go to the lower MAC.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from configserver.cloud.model import LEG_OVERHEAD, Volume, format_size
from configserver.errors import NoRoom, TooFewStorageNodes


@dataclass(frozen=True)
class StorageNode:
    mac: str
    hostname: str | None
    reported_free: int  # bytes, from the latest storage report (0 without one)

    @property
    def label(self) -> str:
        return self.hostname or self.mac


def reported_free(storage: dict[str, Any] | None) -> int:
    """Free bytes of a storage report: its VG's free space, else its empty disks' sizes."""
    if not storage:
        return 0
    vg = storage.get("vg")
    if isinstance(vg, dict):
        return max(0, int(vg.get("free") or 0))
    return sum(int(d.get("size") or 0) for d in storage.get("disks") or ()
               if isinstance(d, dict) and d.get("state") == "empty")


def unreported(volumes: Iterable[Volume], mac: str) -> int:
    """Bytes of the legs placed on ``mac`` that its VG does not count yet."""
    return sum(v.leg_size for v in volumes for leg in v.legs
               if leg.node == mac and leg.state not in ("exported", "removed"))


def free_space(nodes: Sequence[StorageNode], volumes: Sequence[Volume]) -> dict[str, int]:
    return {n.mac: n.reported_free - unreported(volumes, n.mac) for n in nodes}


def place(size: int, nodes: Sequence[StorageNode], volumes: Sequence[Volume], *,
          not_ready: Sequence[str] = (), drained: Sequence[str] = ()) -> tuple[str, str]:
    """The MACs of the two nodes for a volume of ``size`` bytes, or why not.

    ``nodes`` are the ready storage nodes that are not drained; ``not_ready`` and
    ``drained`` name the other storage nodes, for the message.
    """
    if len(nodes) < 2:
        ready = ", ".join(n.label for n in nodes)
        have = f"{len(nodes)} is ready ({ready})" if nodes else "none is ready"
        others = f"; not ready: {', '.join(not_ready)}" if not_ready else ""
        others += f"; drained: {', '.join(drained)}" if drained else ""
        raise TooFewStorageNodes(
            f"a volume needs two ready storage nodes"
            f"{' that are not drained' if drained else ''}: {have}{others}",
            hint="undrain a node ('configserver node undrain NODE')" if drained else
                 "register machines with role storage and boot them "
                 "('configserver node list')")
    leg_size = size + LEG_OVERHEAD
    free = free_space(nodes, volumes)
    ranked = sorted(nodes, key=lambda n: (-free[n.mac], n.mac))
    first, second = ranked[0], ranked[1]
    if free[second.mac] < leg_size:
        raise NoRoom(
            f"{format_size(size)} does not fit: the two storage nodes with most room have "
            f"{format_size(max(0, free[first.mac]))} and {format_size(max(0, free[second.mac]))}"
            f" free ({first.label}, {second.label})",
            hint="a leg takes the volume's size and 4 MiB; add disks or delete volumes")
    return first.mac, second.mac


__all__ = ["StorageNode", "free_space", "place", "reported_free", "unreported"]
