"""Live migrations in SQLite: the checks of a request, and the dom0s' reports applied.

A request (``migrate``) checks everything it can before anything changes: the instance runs
where its claim is, the target is another ready, undrained dom0 with the memory, the same Xen
version, and a leg of the volume it can reach that is in sync. Then, in one transaction, the
instance gets its migration record (with the epoch the target will hold, reserved now) and
the volume a second attachment, the target's, which its storage nodes let in but which the
target does not assemble until the source released it (``cloud.work``'s ``standby``).

The reports (``apply_reports``) drive the phases (``configserver.cloud.migration``). On
completion the claim moves in the same write that clears the record and detaches the volume
from the source; on abort the target's attachment goes and the claim never moved.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import replace

from configserver.cloud.instances import Claim, Desired, Instance
from configserver.cloud.migration import MigrationReport, Outcome, advance, new_migration
from configserver.cloud.model import Attachment, Volume, VolumeState
from configserver.cloud.scheduler import ceiling, choose
from configserver.errors import MigrationRefused, NoRoom, NotFound
from configserver.registry import instances as cloud_instances
from configserver.registry import volumes as cloud_volumes
from configserver.registry.volumes import bump


def volume_of(db: sqlite3.Connection, instance: Instance) -> Volume | None:
    """The instance's disk, if it has one."""
    if instance.volume is None:
        return None
    row = db.execute("SELECT name FROM volumes WHERE id=?", (instance.volume,)).fetchone()
    return cloud_volumes.by_name(db, row["name"]) if row else None


def check(db: sqlite3.Connection, instance: Instance, to: str | None) -> str:
    """The MAC of the dom0 ``instance`` can move to now (``to``, or the scheduler's choice
    among the others); MigrationRefused saying why not."""
    name = instance.name
    if instance.failover is not None:
        raise MigrationRefused(f"instance {name} is being failed over: its dom0 "
                               f"{cloud_volumes.label(db, instance.failover.source)} is lost",
                               hint=f"see 'configserver instance show {name}'")
    if instance.migration is not None:
        raise MigrationRefused(f"instance {name} is already moving to "
                               f"{cloud_volumes.label(db, instance.migration.target)}",
                               hint=f"see 'configserver instance show {name}'")
    if instance.desired != Desired.RUNNING or instance.claim is None:
        raise MigrationRefused(f"instance {name} is not running: there is nothing to migrate",
                               hint=f"'configserver instance start {name} --on NODE' "
                                    "starts it where you want it")
    if instance.actual != "running":
        raise MigrationRefused(f"instance {name} is {instance.actual} on "
                               f"{cloud_volumes.label(db, instance.claim.node)}, not running",
                               hint="migrate it once its dom0 reports it running")
    source = instance.claim.node
    dom0s = cloud_instances.dom0s(db)
    others = [i for i in cloud_instances.load_all(db) if i.id != instance.id]
    if to is not None:
        target = cloud_volumes.dom0(db, to)
        if target == source:
            raise MigrationRefused(f"instance {name} runs on {to} already")
        candidates = [d for d in dom0s if d.mac == target]
    else:
        candidates = [d for d in dom0s if d.mac != source]
    try:
        target = choose(ceiling(instance), candidates, others)
    except NoRoom as exc:
        raise MigrationRefused(f"instance {name} cannot move: {exc.message}",
                               hint="free memory there, wait until it is ready, or name "
                                    "another dom0 with --to") from None
    facts = cloud_instances.dom0_facts(db, source) or {}
    there = cloud_instances.dom0_facts(db, target) or {}
    if not facts.get("version") or facts.get("version") != there.get("version"):
        raise MigrationRefused(
            f"instance {name} cannot move: {cloud_volumes.label(db, source)} runs Xen "
            f"{facts.get('version') or 'unknown'}, {cloud_volumes.label(db, target)} "
            f"{there.get('version') or 'unknown'}",
            hint="migrate between dom0s booted from the same image")
    volume = volume_of(db, instance)
    if volume is None:
        raise MigrationRefused(f"instance {name} has no disk to run from")
    safe = [g for g in volume.legs if g.state == "exported" and g.member == "active"]
    if volume.state != VolumeState.READY or not safe:
        raise MigrationRefused(
            f"instance {name} cannot move: its disk {volume.name} has no leg that is both "
            "exported and in sync", hint=f"see 'configserver volume show {volume.name}'; "
            "migrate once a leg is back in sync")
    if any(a.node not in (source, target) for a in volume.attachments):
        raise MigrationRefused(f"instance {name}'s disk {volume.name} is attached elsewhere",
                               hint=f"'configserver volume show {volume.name}'")
    return target


def migrate(db: sqlite3.Connection, name: str, to: str | None, now: float,
            expect: str | None = None) -> tuple[Instance, int]:
    """Start moving instance ``name`` to ``to`` (or the scheduler's pick); the instance."""
    instance = cloud_instances.by_name(db, name)
    if instance is None or (expect is not None and instance.id != expect):
        raise NotFound(f"no instance {name!r}", hint="see 'configserver instance list'")
    target = check(db, instance, to)
    assert instance.claim is not None
    epoch = instance.epoch + 1
    moving = replace(instance, epoch=epoch, updated=now,
                     migration=new_migration(instance.claim.node, target, epoch, now))
    volume = volume_of(db, instance)
    assert volume is not None
    if volume.attachment(target) is None:
        cloud_volumes.save(db, replace(volume.with_attachment(Attachment(target), target),
                                       updated=now))
    cloud_instances.save(db, moving)
    cloud_instances.event(db, moving, "migrate.requested", now, source=instance.claim.node,
                          target=target, epoch=epoch)
    return moving, bump(db)


def apply_reports(db: sqlite3.Connection, mac: str, reports: Sequence[MigrationReport],
                  now: float) -> int:
    """Dom0 ``mac``'s reports of the migrations it takes part in; how many changed."""
    if not reports:
        return 0
    changed = 0
    for found in cloud_instances.load_all(db):
        current = found
        for report in reports:
            migration = current.migration
            if migration is None or mac not in (migration.source, migration.target):
                break
            outcome = advance(migration, mac, report, now)
            if outcome.migration == migration and not outcome.completed \
                    and outcome.aborted is None:
                continue
            changed += 1
            current = _apply(db, current, outcome, report, now)
    return changed


def _apply(db: sqlite3.Connection, instance: Instance, outcome: Outcome,
           report: MigrationReport,
           now: float) -> Instance:
    migration = instance.migration
    assert migration is not None
    volume = volume_of(db, instance)
    detail: dict[str, object] = {
        "node": migration.target if report.side == "target" else migration.source}
    if report.error:
        detail["error"] = report.error
    if outcome.completed:
        moved = replace(instance, claim=Claim(migration.target, migration.epoch),
                        migration=None, actual="running", updated=now)
        if volume is not None and volume.attachment(migration.source) is not None:
            cloud_volumes.detach(db, name=volume.name, node=migration.source, now=now)
    elif outcome.aborted is not None:
        moved = replace(instance, migration=None, updated=now)
        if volume is not None and volume.attachment(migration.target) is not None:
            cloud_volumes.save(db, replace(volume.with_attachment(None, migration.target),
                                           updated=now))
        detail["error"] = outcome.aborted
    else:
        moved = replace(instance, migration=outcome.migration, updated=now)
        if (outcome.migration is not None and outcome.migration.phase == "released"
                and volume is not None and volume.attachment(migration.source) is not None):
            # The source stopped its array: its attachment goes (in order: it reports it
            # detached, then the storage nodes drop its access).
            cloud_volumes.detach(db, name=volume.name, node=migration.source, now=now)
    cloud_instances.save(db, moved)
    if outcome.stage:
        cloud_instances.event(db, moved, outcome.stage, now, **detail)
    return moved


__all__ = ["apply_reports", "check", "migrate", "volume_of"]
