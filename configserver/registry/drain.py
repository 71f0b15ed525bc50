"""Draining nodes in SQLite (planned maintenance): the per-node flag, its timeline events,
and the one ``node.drained`` event once no dom0 holds a leg of a drained storage node.

Each write is one writer job, like the volumes' (``volumes.py``): a drain or an undrain bumps
the cloud generation, so that the agents' long polls wake. The policy (which legs are held)
is ``configserver.cloud.drain``'s.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from configserver.cloud.drain import legs_held
from configserver.cloud.model import VolumeEvent
from configserver.errors import NotDrainable, NotFound, VolumeInUse
from configserver.model import Node, NodeState
from configserver.registry import events as boot_events
from configserver.registry import volumes
from configserver.registry.schema import load

log = logging.getLogger(__name__)

T = TypeVar("T")


def _node(db: sqlite3.Connection, ref: str) -> Node:
    mac = volumes.resolve_node(db, ref)
    node = load(db, mac) if mac else None
    if node is None:
        raise NotFound(f"no node {ref!r}", hint="name it by hostname or MAC "
                                                 "('configserver node list')")
    return node


def _legs_there(db: sqlite3.Connection, node: Node, stage: str, now: float) -> int:
    """Record ``stage`` on the timeline of every volume with a leg on ``node``; how many."""
    count = 0
    for volume in volumes.load_all(db):
        if volume.leg(node.mac) is not None:
            volumes.add_event(db, VolumeEvent(volume.id, now, stage, {"node": node.mac}))
            count += 1
    return count


def drain(db: sqlite3.Connection, ref: str, now: float) -> tuple[Node, int]:
    """Mark node ``ref`` (MAC or hostname) drained; idempotent. A storage node's legs leave
    the arrays, then its exports; a dom0 must have no volume attached."""
    node = _node(db, ref)
    label = node.hostname or node.mac
    if node.role is None or node.state == NodeState.PENDING:
        raise NotDrainable(f"{label} is a pending node: there is nothing to drain",
                           hint="only registered storage and dom0 nodes drain")
    if node.role not in ("storage", "dom0"):
        raise NotDrainable(f"{label} is a {node.role} node: only storage and dom0 nodes "
                           "drain", hint="power it off when you like")
    if node.drained is not None:
        return node, volumes.generation(db)
    if node.role == "dom0":
        attached = [v.name for v in volumes.load_all(db) if v.attachment(node.mac)]
        if attached:
            raise VolumeInUse(
                f"{label} has volumes attached ({', '.join(attached)}): detach its volumes "
                "first; moving them live comes with instances",
                hint=f"'configserver volume detach {attached[0]} {label}'")
    db.execute("UPDATE nodes SET drained=?, drain_done=NULL, updated=? WHERE mac=?",
               (now, now, node.mac))
    legs = _legs_there(db, node, "leg.leaving", now)
    boot_events.add(db, node.mac, "node.drain", {"legs": legs}, now)
    log.info("%s (%s): drain requested, %d legs there", node.mac, label, legs)
    settle(db, now)
    return _node(db, node.mac), volumes.bump(db)


def undrain(db: sqlite3.Connection, ref: str, now: float) -> tuple[Node, int]:
    """Bring node ``ref`` back: its exports return, and the dom0s take its legs back (md's
    bitmap resyncs only what changed). Idempotent."""
    node = _node(db, ref)
    if node.drained is None:
        return node, volumes.generation(db)
    db.execute("UPDATE nodes SET drained=NULL, drain_done=NULL, updated=? WHERE mac=?",
               (now, node.mac))
    legs = _legs_there(db, node, "leg.back", now)
    boot_events.add(db, node.mac, "node.undrain", {"legs": legs}, now)
    log.info("%s (%s): undrained, %d legs come back", node.mac, node.hostname or node.mac,
             legs)
    return _node(db, node.mac), volumes.bump(db)


def settle(db: sqlite3.Connection, now: float) -> None:
    """Record ``node.drained`` (once per drain) on each drained storage node no dom0 holds
    a leg of any more: it is safe to power off."""
    waiting = [r[0] for r in db.execute(
        "SELECT mac FROM nodes WHERE drained IS NOT NULL AND drain_done IS NULL "
        "AND role='storage'")]
    if not waiting:
        return
    current = volumes.load_all(db)
    for mac in waiting:
        if legs_held(current, mac) == 0:
            db.execute("UPDATE nodes SET drain_done=? WHERE mac=?", (now, mac))
            boot_events.add(db, mac, "node.drained", {}, now)
            log.info("%s: drained, no dom0 holds a leg there: safe to power off", mac)


def settling(job: Callable[..., T]) -> Callable[..., T]:
    """``job`` (a writer job of ``volumes``), then ``settle`` in the same transaction."""
    def run(db: sqlite3.Connection, **kwargs: Any) -> T:
        result = job(db, **kwargs)
        settle(db, kwargs["now"])
        return result
    return run


__all__ = ["drain", "settle", "settling", "undrain"]
