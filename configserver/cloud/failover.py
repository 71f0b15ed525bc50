"""Failover of a lost dom0's instances, fenced at the storage first (pure).

A dom0 that stops heartbeating is declared lost (``lost_after``). Each instance it ran is
then *fenced*: in one write the dom0's access to the instance's disk is revoked (its
attachment goes, so the storage nodes' work no longer names its initiator) and the instance
gets a ``Failover`` record naming the storage nodes that must confirm. A storage node
confirms with a report that follows the work of that write's generation or a later one and
shows no session of the fenced dom0 on the volume's export (LIO deleted its ACL, which ends
its sessions at once). Only when every leg's node confirmed does the instance get a new
claim (a new epoch) on another dom0; until then it is ``unknown``, with the reason.

A migration under way when its source or target is lost is settled first
(``migration_fate``): one that the source had released already belongs to the target.

No I/O, no registry, no HTTP.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from configserver.cloud.migration import RELEASED
from configserver.cloud.model import initiator_iqn

if TYPE_CHECKING:  # ``instances`` holds a Failover on each instance: no import cycle
    from configserver.cloud.instances import Instance

UNKNOWN = "unknown"  # the actual state of an instance whose dom0 is lost, until it restarts


@dataclass(frozen=True)
class Failover:
    """An instance's way out of lost dom0 ``source``: fenced at the storage in the write
    that made cloud generation ``generation``; restarted once ``legs`` all confirmed."""

    source: str
    since: float
    generation: int
    legs: tuple[str, ...]
    confirmed: tuple[str, ...] = ()
    reason: str = ""  # why it has not restarted yet (empty: nothing but the confirmations)

    @property
    def fenced(self) -> bool:
        return set(self.legs) <= set(self.confirmed)

    def waiting_for(self) -> tuple[str, ...]:
        return tuple(node for node in self.legs if node not in self.confirmed)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "since": self.since, "generation": self.generation,
                "legs": list(self.legs), "confirmed": list(self.confirmed),
                "reason": self.reason}


def from_json(data: dict[str, Any] | None) -> Failover | None:
    if not data:
        return None
    return Failover(str(data["source"]), float(data["since"]), int(data["generation"]),
                    tuple(str(n) for n in data.get("legs") or ()),
                    tuple(str(n) for n in data.get("confirmed") or ()),
                    str(data.get("reason") or ""))


@dataclass(frozen=True)
class Fate:
    """What losing a dom0 means for one instance: ``fence`` (its guest may run there: fence
    it, then restart it elsewhere), and whether a migration under way ends (``abort``)."""

    fence: bool
    abort: bool = False


def migration_fate(instance: Instance, lost: str) -> Fate | None:
    """How losing dom0 ``lost`` touches ``instance``; None: not at all.

    * No migration: fenced if ``lost`` holds its claim.
    * ``lost`` is the target: before the source released the array the guest still runs at
      the source, so the migration is aborted and nothing is fenced; after it, the guest is
      (paused or running) on the target, so the target is fenced.
    * ``lost`` is the source: after the release the guest is the target's, which completes
      the move by itself; before it, the migration is aborted and the source fenced.
    """
    moving = instance.migration
    held = instance.claim is not None and instance.claim.node == lost
    if instance.failover is not None:
        return None  # already on its way out
    if moving is None:
        return Fate(fence=True) if held else None
    released = moving.phase == RELEASED
    if moving.target == lost:
        return Fate(fence=True, abort=True) if released else Fate(fence=False, abort=True)
    if moving.source == lost:
        return None if released else Fate(fence=True, abort=True)
    return None


def start_failover(instance: Instance, lost: str, legs: Collection[str], generation: int,
                   now: float) -> Instance:
    """``instance`` fenced from ``lost`` in the write that makes ``generation``."""
    record = Failover(lost, now, generation, tuple(sorted(legs)))
    return replace(instance, failover=record, migration=None, actual=UNKNOWN, updated=now)


@dataclass(frozen=True)
class ExportSeen:
    """What a storage node's report says of one volume's export: its state, error and the
    initiators with a live session."""

    state: str
    error: str | None
    sessions: tuple[str, ...]
    acls: tuple[str, ...] | None = None  # None: the agent does not report them


def confirm(record: Failover, node: str, seen: int | None,
            exports: Mapping[str, ExportSeen], *, volume: str, labels: Mapping[str, str]
            ) -> Failover:
    """``record`` after storage node ``node``'s report (following the work of generation
    ``seen``): confirmed if that work already left the fenced dom0 out and the volume's
    export, if there still is one, has no session of it; else the reason why not."""
    if node not in record.legs or node in record.confirmed:
        return record
    label = labels.get(node, node)
    if seen is None or seen < record.generation:
        return record  # a report of older work: the revocation is not in it yet
    export = exports.get(volume)
    if export is not None and export.state == "error":
        return replace(record, reason=f"storage node {label} could not apply the fence: "
                                      f"{export.error or 'export error'}")
    fenced = initiator_iqn(record.source)
    lost = labels.get(record.source, record.source)
    if export is not None and fenced in export.sessions:
        return replace(record, reason=f"storage node {label} still has a session of {lost}")
    if export is not None and export.acls is not None and fenced in export.acls:
        return replace(record, reason=f"storage node {label} still lets {lost} in")
    return replace(record, confirmed=tuple(sorted({*record.confirmed, node})), reason="")


def waiting_reason(record: Failover, labels: Mapping[str, str],
                   lost: Collection[str] = frozenset()) -> str:
    """Why ``record``'s instance has not restarted yet, in words (its own reason first)."""
    if record.reason:
        return record.reason
    waiting = record.waiting_for()
    if not waiting:
        return ""
    names = ", ".join(labels.get(n, n) + (" (lost)" if n in lost else "") for n in waiting)
    return (f"fencing {labels.get(record.source, record.source)}: waiting for storage "
            f"node{'s' if len(waiting) > 1 else ''} {names} to confirm; nothing restarts "
            "until then")


def after_fence(instance: Instance) -> str:
    """What a fenced instance comes to: ``restart`` (wanted running: placed again),
    ``release`` (wanted stopped: the claim given back) or ``forget`` (being destroyed)."""
    if instance.desired == "running":
        return "restart"
    return "forget" if instance.desired == "destroyed" else "release"


__all__ = ["UNKNOWN", "ExportSeen", "Failover", "Fate", "after_fence", "confirm",
           "from_json", "migration_fate", "start_failover", "waiting_reason"]
