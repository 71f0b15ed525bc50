"""Which dom0 an instance starts on (pure): a ready, undrained dom0 with room for its memory,
spreading instances.

A dom0's room is the free memory its agent last reported (``xl info``), minus what the
instances it holds the claim of may still take: all of their memory ceiling (``max_memory``,
else their memory) while its report does not count them yet (not reported running there),
and the rest of the ceiling above their memory once it does, so that raising a guest's
memory within its ceiling never finds the dom0 full. An instance is placed by its ceiling.
Among those with room, the one holding fewest claims wins, then the one with most room,
then the lower MAC. A refusal names every dom0 and why it was not chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from configserver.cloud.instances import Instance
from configserver.cloud.model import MIB, format_size
from configserver.errors import NoRoom


@dataclass(frozen=True)
class Dom0:
    mac: str
    hostname: str | None
    free_memory: int | None  # bytes, from the latest report (None: never reported)
    ready: bool = True
    drained: bool = False

    @property
    def label(self) -> str:
        return self.hostname or self.mac


def ceiling(instance: Instance) -> int:
    """The most memory ``instance`` may hold: its ``max_memory``, else its memory."""
    return max(instance.memory, instance.resources.max_memory)


def pending_memory(instances: Sequence[Instance], mac: str) -> int:
    """Memory the instances claimed on ``mac`` may take that its report does not count, and
    that of the instances on their way to it (a live migration)."""
    return sum(ceiling(i) - (i.memory if i.actual == "running" else 0) for i in instances
               if i.claim is not None and i.claim.node == mac) + sum(
        ceiling(i) for i in instances if i.migration is not None and i.migration.target == mac)


def choose(memory: int, dom0s: Sequence[Dom0], instances: Sequence[Instance]) -> str:
    """The MAC of the dom0 for an instance of ``memory`` bytes, or NoRoom saying why."""
    reasons, fits = [], []
    for node in sorted(dom0s, key=lambda d: d.mac):
        if not node.ready:
            reasons.append(f"{node.label}: not ready")
        elif node.drained:
            reasons.append(f"{node.label}: drained")
        elif node.free_memory is None:
            reasons.append(f"{node.label}: has not reported its memory yet")
        else:
            room = node.free_memory - pending_memory(instances, node.mac)
            if room < memory:
                reasons.append(f"{node.label}: {format_size(max(0, room))} free")
            else:
                held = sum(1 for i in instances if i.claim and i.claim.node == node.mac)
                fits.append((held, -room, node.mac))
    if not fits:
        why = "; ".join(reasons) if reasons else "there is no dom0"
        raise NoRoom(f"no dom0 can take {format_size(memory)} of memory: {why}",
                     hint="free memory, undrain or boot a dom0, or ask for less "
                          "(--memory); --on NODE names one")
    return min(fits)[2]


def free_memory(facts: dict | None) -> int | None:
    """Free bytes from a dom0 report's ``xen`` facts."""
    value = (facts or {}).get("free_memory_mib")
    return int(value) * MIB if isinstance(value, int) and not isinstance(value, bool) else None


__all__ = ["Dom0", "ceiling", "choose", "free_memory", "pending_memory"]
