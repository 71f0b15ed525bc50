"""Draining nodes in SQLite (planned maintenance): the per-node flag, its timeline events,
the live migrations that take a drained dom0's instances away, and the one ``node.drained``
event once no dom0 holds a leg of a drained storage node, or a drained dom0 no claim.

Each write is one writer job, like the volumes' (``volumes.py``): a drain or an undrain bumps
the cloud generation, so that the agents' long polls wake. The policy (which legs are held,
which instances move next) is ``configserver.cloud.drain``'s; ``settle`` applies it after
every report, so a drained dom0 sends its next instance as soon as one arrived elsewhere.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from configserver.cloud import drain as policy
from configserver.cloud.drain import legs_held
from configserver.cloud.instances import Instance
from configserver.cloud.model import VolumeEvent
from configserver.errors import MigrationRefused, NotDrainable, NotFound, VolumeInUse
from configserver.model import Node, NodeState
from configserver.registry import ReportOutcome, failover, migrations, volumes
from configserver.registry import events as boot_events
from configserver.registry import instances as cloud_instances
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


def drain(db: sqlite3.Connection, ref: str, now: float,
          parallel: int | None = None) -> tuple[Node, int]:
    """Mark node ``ref`` (MAC or hostname) drained; idempotent. A storage node's legs leave
    the arrays, then its exports; a dom0's instances migrate away, ``parallel`` at a time
    (a second drain may change it), and it must have no other volume attached."""
    node = _node(db, ref)
    label = node.hostname or node.mac
    if node.role is None or node.state == NodeState.PENDING:
        raise NotDrainable(f"{label} is a pending node: there is nothing to drain",
                           hint="only registered storage and dom0 nodes drain")
    if node.role not in ("storage", "dom0"):
        raise NotDrainable(f"{label} is a {node.role} node: only storage and dom0 nodes "
                           "drain", hint="power it off when you like")
    limit = policy.parallel(parallel)
    if node.drained is not None:
        if node.role == "dom0" and parallel is not None:
            db.execute("UPDATE nodes SET drain_limit=? WHERE mac=?", (limit, node.mac))
            settle(db, now)
            return node, volumes.bump(db)
        return node, volumes.generation(db)
    if node.role == "dom0":
        disks = {i.volume for i in cloud_instances.load_all(db) if i.volume is not None and (
            (i.claim is not None and i.claim.node == node.mac)
            or (i.migration is not None and i.migration.target == node.mac))}
        attached = [v.name for v in volumes.load_all(db) if v.id not in disks
                    and (a := v.attachment(node.mac)) is not None and not a.detaching]
        if attached:
            raise VolumeInUse(
                f"{label} has volumes attached that are no instance's disk there "
                f"({', '.join(attached)}): detach them first",
                hint=f"'configserver volume detach {attached[0]} {label}'")
    db.execute("UPDATE nodes SET drained=?, drain_done=NULL, drain_limit=?, updated=? "
               "WHERE mac=?", (now, limit, now, node.mac))
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


def settle(db: sqlite3.Connection, now: float) -> bool:
    """Record ``node.drained`` (once per drain) on each drained storage node no dom0 holds
    a leg of any more, and on each drained dom0 holding no claim: it is safe to power off.
    A drained dom0 that still holds some sends the next of them away. Whether this bumped
    the generation (a migration started)."""
    waiting = db.execute("SELECT mac, role, drained, drain_limit FROM nodes WHERE drained "
                         "IS NOT NULL AND drain_done IS NULL AND role IN ('storage', 'dom0')"
                         ).fetchall()
    if not waiting:
        return False
    current = volumes.load_all(db) if any(r["role"] == "storage" for r in waiting) else []
    moved = False
    for row in waiting:
        mac = row["mac"]
        if row["role"] == "dom0":
            started, held = _move_away(db, row, now)
            moved = moved or started
            if held:
                continue
        elif legs_held(current, mac) != 0:
            continue
        db.execute("UPDATE nodes SET drain_done=? WHERE mac=?", (now, mac))
        boot_events.add(db, mac, "node.drained", {}, now)
        log.info("%s: drained (%s): safe to power off", mac, "no claim there any more"
                 if row["role"] == "dom0" else "no dom0 holds a leg there")
    return moved


def _failures(db: sqlite3.Connection, instance: Instance, since: float) -> list[str]:
    """The errors of ``instance``'s migrations that failed since ``since``, oldest first."""
    rows = db.execute("SELECT detail FROM instance_events WHERE instance=? AND "
                      "stage='migrate.failed' AND time>=? ORDER BY id", (instance.id, since))
    return [str(json.loads(r["detail"]).get("error") or "failed") for r in rows]


def _move_away(db: sqlite3.Connection, row: sqlite3.Row, now: float) -> tuple[bool, int]:
    """Start the next migrations out of draining dom0 ``row``: whether any started, and how
    many instances it still holds (a migration moves the claim only once it is done)."""
    mac, limit = row["mac"], row["drain_limit"] or policy.DEFAULT_PARALLEL
    everything = cloud_instances.load_all(db)
    held = policy.held_by(everything, mac)
    failures = {i.id: len(_failures(db, i, row["drained"])) for i in held if i.migration is None}
    started = False
    for instance in policy.next_moves(everything, mac, limit, failures):
        try:
            migrations.migrate(db, instance.name, None, now)
        except MigrationRefused:
            continue  # not yet (see ``dom0_status``): the next report tries again
        started = True
        log.info("%s: drain sends %s away", mac, instance.name)
    return started, len(held)


def dom0_status(db: sqlite3.Connection, node: Node) -> dict[str, Any] | None:
    """What a drained dom0's drain is doing (``policy.dom0_drain_status``), with why each
    instance that is not moving does not move now; None for any other node."""
    if node.role != "dom0" or node.drained is None:
        return None
    row = db.execute("SELECT drain_limit FROM nodes WHERE mac=?", (node.mac,)).fetchone()
    limit = (row["drain_limit"] if row else None) or policy.DEFAULT_PARALLEL
    everything = cloud_instances.load_all(db)
    stuck = {}
    for instance in policy.held_by(everything, node.mac):
        if instance.migration is not None:
            continue
        failed = _failures(db, instance, node.drained)
        if len(failed) >= policy.TRIES:
            stuck[instance.name] = (f"{len(failed)} migrations failed, it stays: "
                                    f"{failed[-1]}", True)
            continue
        try:
            migrations.check(db, instance, None)
        except MigrationRefused as exc:
            stuck[instance.name] = (exc.message, False)
    return policy.dom0_drain_status(node, everything, limit, stuck)


def settling(job: Callable[..., T]) -> Callable[..., T]:
    """``job`` (a writer job of ``volumes``), then the failovers' and the drains' ``settle``
    in the same transaction; a generation in what the job answers is the one after all."""
    def run(db: sqlite3.Connection, **kwargs: Any) -> T:
        result = job(db, **kwargs)
        restarted = failover.settle(db, kwargs["now"])
        if not settle(db, kwargs["now"]) and not restarted:
            return result
        current = volumes.generation(db)
        if isinstance(result, ReportOutcome):
            return replace(result, generation=current)  # type: ignore[return-value]
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], int):
            return (result[0], current)  # type: ignore[return-value]
        return result
    return run


__all__ = ["dom0_status", "drain", "settle", "settling", "undrain"]
