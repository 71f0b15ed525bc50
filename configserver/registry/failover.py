"""Failover in SQLite: fencing a lost dom0 at the storage, then its instances restarted.

Three writer-job steps, each whole or nothing (the policy is ``configserver.cloud.failover``):

* ``fence_lost`` (the lost-node sweep, after ``mark_lost``): every instance whose guest may
  run on a dom0 in state ``lost`` has that dom0's attachment of its disk revoked, a migration
  under way settled, and a failover record naming the storage nodes that must confirm. It
  looks at every lost dom0 each time, so a crash between marking and fencing only delays it.
* ``storage_report`` (each storage report): the confirmations it carries.
* ``settle`` (after every report, like the drain's): a fully fenced instance is placed on
  another dom0 (new claim, new epoch, its disk attached there), given back, or forgotten.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import replace

from configserver.cloud import failover as policy
from configserver.cloud.instances import Instance, claim
from configserver.cloud.model import Volume
from configserver.cloud.reports import StorageReport
from configserver.cloud.scheduler import ceiling, choose
from configserver.errors import Conflict, NoRoom, VolumeInUse
from configserver.model import NodeState
from configserver.registry import instances as cloud_instances
from configserver.registry import volumes as cloud_volumes
from configserver.registry.migrations import volume_of

log = logging.getLogger(__name__)


def labels(db: sqlite3.Connection) -> dict[str, str]:
    return {r["mac"]: r["hostname"] or r["mac"]
            for r in db.execute("SELECT mac, hostname FROM nodes")}


def _lost(db: sqlite3.Connection) -> set[str]:
    return {r["mac"] for r in db.execute("SELECT mac FROM nodes WHERE state=?",
                                         (str(NodeState.LOST),))}


def _revoke(db: sqlite3.Connection, volume: Volume | None, mac: str, now: float) -> None:
    """``mac``'s access to ``volume`` dropped at once (``volume detach --force``)."""
    if volume is not None and volume.attachment(mac) is not None:
        cloud_volumes.detach(db, name=volume.name, node=mac, now=now, force=True)


def fence_lost(db: sqlite3.Connection, now: float) -> bool:
    """Fence every instance of every lost dom0 that is not fenced yet; whether any was (the
    generation was bumped: the storage nodes' long polls must wake)."""
    lost = [r["mac"] for r in db.execute("SELECT mac FROM nodes WHERE role='dom0' AND state=?",
                                         (str(NodeState.LOST),))]
    if not lost:
        return False
    fenced: list[Instance] = []
    aborted = False
    for found in cloud_instances.load_all(db):
        current = found
        for mac in lost:
            fate = policy.migration_fate(current, mac)
            if fate is None:
                continue
            volume = volume_of(db, current)
            moving = current.migration
            if fate.abort and moving is not None:
                if moving.target != mac:
                    _revoke(db, volume, moving.target, now)  # it prepared, never assembled
                error = f"{'target' if moving.target == mac else 'source'} dom0 is lost"
                cloud_instances.event(db, current, "migrate.failed", now, node=mac,
                                      error=error)
            _revoke(db, volume, mac, now)
            if not fate.fence:
                current = replace(current, migration=None, updated=now)
                cloud_instances.save(db, current)
                aborted = True
                continue
            legs = [g.node for g in volume.legs] if volume is not None else []
            current = policy.start_failover(current, mac, legs, 0, now)
            fenced.append(current)
            break  # fenced: nothing more to settle for it
    for volume in cloud_volumes.load_all(db):  # an ordered detach it will never finish
        for attachment in volume.attachments:
            if attachment.node in lost and attachment.detaching:
                _revoke(db, volume, attachment.node, now)
                aborted = True
    if not fenced:
        return aborted  # the revocation bumped the generation
    generation = cloud_volumes.bump(db)  # its work, and any later, leaves the dom0s out
    names, gone = labels(db), _lost(db)
    for instance in fenced:
        assert instance.failover is not None
        record = replace(instance.failover, generation=generation)
        record = replace(record, reason=policy.waiting_reason(record, names, gone))
        cloud_instances.save(db, replace(instance, failover=record))
        cloud_instances.event(db, instance, "failover.fencing", now, node=record.source,
                              generation=generation, legs=list(record.legs))
        log.warning("instance %s: %s is lost; fencing it at %s before a restart elsewhere",
                    instance.name, names.get(record.source, record.source),
                    ", ".join(names.get(n, n) for n in record.legs) or "no storage node")
    return True


def _failing_over(db: sqlite3.Connection) -> bool:
    """Whether any instance has a failover record (every report asks: kept cheap)."""
    return db.execute("SELECT 1 FROM instances WHERE failover IS NOT NULL LIMIT 1"
                      ).fetchone() is not None


def storage_report(db: sqlite3.Connection, mac: str, report: StorageReport,
                   seen: int | None, now: float) -> None:
    """The fence confirmations in storage node ``mac``'s report of generation ``seen``."""
    if not _failing_over(db):
        return
    waiting = [i for i in cloud_instances.load_all(db)
               if i.failover is not None and mac in i.failover.legs
               and mac not in i.failover.confirmed]
    if not waiting:
        return
    exports = {e.volume: policy.ExportSeen(e.state, e.error, e.sessions, e.acls)
               for e in report.exports}
    names, gone = labels(db), _lost(db)
    for instance in waiting:
        record = instance.failover
        assert record is not None
        new = policy.confirm(record, mac, seen, exports, volume=instance.volume or "",
                             labels=names)
        if new == record:
            continue
        if mac in new.confirmed:
            new = replace(new, reason=policy.waiting_reason(replace(new, reason=""), names,
                                                            gone))
        cloud_instances.save(db, replace(instance, failover=new, updated=now))
        if mac in new.confirmed:
            cloud_instances.event(db, instance, "failover.confirmed", now, node=mac,
                                  generation=seen)
        else:
            cloud_instances.event(db, instance, "failover.unconfirmed", now, node=mac,
                                  reason=new.reason)


def settle(db: sqlite3.Connection, now: float) -> bool:
    """Every fully fenced instance restarted elsewhere (or given back, or forgotten);
    whether the generation was bumped."""
    if not _failing_over(db):
        return False
    done = [i for i in cloud_instances.load_all(db)
            if i.failover is not None and i.failover.fenced]
    changed = False
    for instance in done:
        record = instance.failover
        assert record is not None
        fate = policy.after_fence(instance)
        free = replace(instance, claim=None, failover=None, actual="stopped", updated=now)
        if fate == "forget":
            cloud_instances.forget(db, free, now)
            changed = True
            continue
        if fate == "release":
            cloud_instances.save(db, free)
            cloud_instances.event(db, free, "claim.released", now, node=record.source,
                                  reason="its dom0 was lost and fenced")
            changed = True
            continue
        changed = _restart(db, instance, free, record, now) or changed
    if changed:
        cloud_volumes.bump(db)
    return changed


def _restart(db: sqlite3.Connection, instance: Instance, free: Instance,
             record: policy.Failover, now: float) -> bool:
    """``free`` (fenced, no claim) placed on a dom0 other than the lost one; False, with the
    reason kept on the record, if none can take it now."""
    others = [i for i in cloud_instances.load_all(db) if i.id != instance.id]
    candidates = [d for d in cloud_instances.dom0s(db) if d.mac != record.source]
    try:
        mac = choose(ceiling(instance), candidates, others)
        placed = claim(free, mac)
        placed = replace(placed, desired_generation=cloud_volumes.generation(db) + 1)
        volume = volume_of(db, instance)
        if volume is not None and volume.attachment(record.source) is not None:
            raise VolumeInUse(f"volume {volume.name} is attached to the lost dom0 again",
                              hint="that must not happen: report it")
        if volume is not None:
            cloud_volumes.attach(db, name=volume.name, node=mac, now=now, failover=True)
    except (NoRoom, VolumeInUse, Conflict) as exc:
        reason = f"fenced, but not restarted yet: {exc.message}"
        if record.reason != reason:
            cloud_instances.save(db, replace(instance, failover=replace(record, reason=reason)))
            cloud_instances.event(db, instance, "failover.waiting", now, reason=reason)
        return False
    cloud_instances.save(db, placed)
    assert placed.claim is not None
    cloud_instances.event(db, placed, "failover.restarted", now, node=mac,
                          epoch=placed.claim.epoch, lost=record.source,
                          seconds=round(now - record.since, 1))
    names = labels(db)
    log.warning("instance %s restarted on %s (epoch %d): %s was lost and is fenced",
                instance.name, names.get(mac, mac), placed.claim.epoch,
                names.get(record.source, record.source))
    return True


def fail_over(db: sqlite3.Connection, now: float) -> int | None:
    """The sweep's job: ``fence_lost``, then ``settle`` (an instance without storage to
    confirm restarts at once); the generation if either changed anything."""
    fenced = fence_lost(db, now)
    restarted = settle(db, now)
    return cloud_volumes.generation(db) if fenced or restarted else None


__all__ = ["fail_over", "fence_lost", "labels", "settle", "storage_report"]
