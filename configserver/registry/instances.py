"""Instances and the guest map in SQLite: rows, claims and timelines.

Each write is one writer job (``writer.py``): whole or nothing. A claim changes only inside
such a job, by ``configserver.cloud.instances``' transitions, so concurrent starts of one
instance are serialised here and at most one of them can hand the claim to a dom0. Every
change of desired state bumps the cloud generation in the same transaction (the dom0s' work).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from configserver.cloud.failover import from_json as failover_from_json
from configserver.cloud.guestreports import apply_guests, parse_guests, totals
from configserver.cloud.instances import (
    Claim,
    Desired,
    Instance,
    InstanceNic,
    claim,
    new_instance_id,
    new_mac,
    pick_ip,
    release,
    validate_memory,
)
from configserver.cloud.migration import from_json as migration_from_json
from configserver.cloud.migration import parse_reports
from configserver.cloud.model import Volume, new_volume_id
from configserver.cloud.reports import parse_storage
from configserver.cloud.resources import Resources, updated
from configserver.cloud.resources import from_json as resources_from_json
from configserver.cloud.scheduler import Dom0, ceiling, choose, free_memory
from configserver.errors import Conflict, DuplicateVolume, NotFound, VolumeInUse
from configserver.model import NodeState
from configserver.registry import ReportOutcome
from configserver.registry import events as node_events
from configserver.registry import volumes as cloud_volumes
from configserver.registry.schema import owner
from configserver.registry.volumes import bump, generation

_encode = json.JSONEncoder(default=str, separators=(",", ":")).encode
USAGE_SAMPLE = 300.0  # seconds between two samples of an instance's usage, at least
USAGE_KEPT = 400 * 86400.0  # samples kept this long (a billing year and a margin)
# An agent event's keys that are not its detail (or would clash with ``event``'s own names).
_NOT_DETAIL = frozenset({"stage", "time", "node", "db", "instance", "now"})


def _instance(row: sqlite3.Row, nics: Sequence[sqlite3.Row]) -> Instance:
    held = (Claim(row["claim_node"], row["claim_epoch"])
            if row["claim_node"] is not None else None)
    return Instance(
        id=row["id"], name=row["name"], memory=row["memory"], vcpus=row["vcpus"],
        volume=row["volume"], image=row["image"], tenant=row["tenant"],
        desired=Desired(row["desired"]), actual=row["actual"], claim=held,
        epoch=row["epoch"], ssh_keys=tuple(json.loads(row["ssh_keys"])),
        usage=json.loads(row["usage"]), created=row["created"], updated=row["updated"],
        reboots=row["reboots"], delete_disk=bool(row["delete_disk"]),
        desired_generation=row["desired_generation"],
        resources=resources_from_json(json.loads(row["resources"])),
        migration=migration_from_json(json.loads(row["migration"]) if row["migration"] else None),
        failover=failover_from_json(json.loads(row["failover"]) if row["failover"] else None),
        nics=tuple(InstanceNic(n["mac"], n["ip"]) for n in nics))


def load_all(db: sqlite3.Connection) -> list[Instance]:
    nics: dict[str, list[sqlite3.Row]] = {}
    for nic in db.execute("SELECT * FROM instance_nics ORDER BY instance, position"):
        nics.setdefault(nic["instance"], []).append(nic)
    return [_instance(row, nics.get(row["id"], []))
            for row in db.execute("SELECT * FROM instances ORDER BY name")]


def counts(db: sqlite3.Connection) -> list[tuple[str, str, str | None, int, int]]:
    """``(desired, actual, claim node, instances, their memory in bytes)`` per group."""
    return [(r[0], r[1], r[2], r[3], r[4]) for r in db.execute(
        "SELECT desired, actual, claim_node, COUNT(*), SUM(memory) FROM instances "
        "GROUP BY desired, actual, claim_node ORDER BY desired, actual, claim_node")]


def by_name(db: sqlite3.Connection, name: str) -> Instance | None:
    row = db.execute("SELECT * FROM instances WHERE name=?", (name,)).fetchone()
    if row is None:
        return None
    nics = db.execute("SELECT * FROM instance_nics WHERE instance=? ORDER BY position",
                      (row["id"],)).fetchall()
    return _instance(row, nics)


def nic(db: sqlite3.Connection, mac: str) -> tuple[Instance, InstanceNic] | None:
    """The instance that has NIC ``mac``, and that NIC (the DHCP server's question)."""
    row = db.execute("SELECT i.name FROM instance_nics n JOIN instances i ON i.id=n.instance "
                     "WHERE n.mac=?", (mac,)).fetchone()
    found = by_name(db, row[0]) if row else None
    if found is None:
        return None
    return found, next(n for n in found.nics if n.mac == mac)


def used_addresses(db: sqlite3.Connection) -> tuple[set[str], set[str]]:
    """(MACs, IPs) that instance NICs and registered nodes' NICs hold: an instance takes
    neither a node's MAC nor its reserved address."""
    rows = db.execute("SELECT mac, ip FROM instance_nics UNION ALL "
                      "SELECT mac, ip FROM nics").fetchall()
    return {r["mac"] for r in rows}, {r["ip"] for r in rows if r["ip"]}


def save(db: sqlite3.Connection, instance: Instance) -> None:
    held = instance.claim
    db.execute(
        "INSERT INTO instances (id, name, memory, vcpus, volume, image, tenant, desired,"
        " actual, claim_node, claim_epoch, epoch, ssh_keys, usage, reboots, delete_disk,"
        " desired_generation, resources, created, updated, migration, failover)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT(id) DO UPDATE SET"
        " memory=excluded.memory, vcpus=excluded.vcpus, volume=excluded.volume,"
        " desired=excluded.desired, actual=excluded.actual, claim_node=excluded.claim_node,"
        " claim_epoch=excluded.claim_epoch, epoch=excluded.epoch, usage=excluded.usage,"
        " reboots=excluded.reboots, delete_disk=excluded.delete_disk,"
        " desired_generation=excluded.desired_generation, resources=excluded.resources,"
        " updated=excluded.updated, migration=excluded.migration,"
        " failover=excluded.failover",
        (instance.id, instance.name, instance.memory, instance.vcpus, instance.volume,
         instance.image, instance.tenant, str(instance.desired), instance.actual,
         held.node if held else None, held.epoch if held else None, instance.epoch,
         _encode(list(instance.ssh_keys)), _encode(instance.usage), instance.reboots,
         int(instance.delete_disk), instance.desired_generation,
         _encode(instance.resources.to_json()), instance.created, instance.updated,
         _encode(instance.migration.to_json()) if instance.migration else None,
         _encode(instance.failover.to_json()) if instance.failover else None))
    db.execute("DELETE FROM instance_nics WHERE instance=?", (instance.id,))
    db.executemany("INSERT INTO instance_nics VALUES (?,?,?,?)",
                   [(n.mac, instance.id, i, n.ip) for i, n in enumerate(instance.nics)])


def event(db: sqlite3.Connection, instance: Instance, stage: str, now: float,
          **detail: Any) -> None:
    db.execute("INSERT INTO instance_events (instance, time, stage, detail) VALUES (?,?,?,?)",
               (instance.id, now, stage, _encode(detail)))


def events(db: sqlite3.Connection, instance_id: str, limit: int = 500) -> list[dict[str, Any]]:
    rows = db.execute("SELECT time, stage, detail FROM instance_events WHERE instance=? "
                      "ORDER BY id DESC LIMIT ?", (instance_id, limit)).fetchall()
    return [{"time": r["time"], "stage": r["stage"], "detail": json.loads(r["detail"])}
            for r in reversed(rows)]


def create(db: sqlite3.Connection, instance: Instance, now: float) -> tuple[Instance, int]:
    """Store a new (stopped, unclaimed) instance; its volume exists already."""
    if db.execute("SELECT 1 FROM instances WHERE name=?", (instance.name,)).fetchone():
        raise DuplicateVolume(f"instance {instance.name!r} exists",
                              hint="choose another name, or destroy it first")
    fresh = replace(instance, desired=Desired.STOPPED, claim=None, epoch=0,
                    created=now, updated=now)
    save(db, fresh)
    event(db, fresh, "created", now, memory=fresh.memory, vcpus=fresh.vcpus,
          volume=fresh.volume, nics=[{"mac": n.mac, "ip": n.ip} for n in fresh.nics])
    return fresh, bump(db)


def volume_follows(db: sqlite3.Connection, instance: Instance, node: str, now: float, *,
                    attach: bool) -> None:
    """The instance's volume attached to the dom0 given its claim (VolumeInUse while it is
    still attached to, or detaching from, another: the start then stores nothing), or
    detached, in order, from the dom0 that gave the claim back."""
    if instance.volume is None:
        return
    row = db.execute("SELECT name FROM volumes WHERE id=?", (instance.volume,)).fetchone()
    volume = cloud_volumes.by_name(db, row["name"]) if row else None
    if volume is None:
        return
    if attach:
        cloud_volumes.attach(db, name=volume.name, node=node, now=now)
    elif volume.attachment(node) is not None:
        cloud_volumes.detach(db, name=volume.name, node=node, now=now)


def create_with_disk(db: sqlite3.Connection, *, name: str, memory: int, vcpus: int,
                     image: str | None, disk: int, tenant: str | None,
                     ssh_keys: tuple[str, ...], pool: tuple[str, str] | None, ip: str | None,
                     now: float, resources: Resources | None = None) -> tuple[Instance, int]:
    """A new instance and its volume ``<name>-disk`` (from ``image``) in one transaction:
    its NIC's MAC (00:16:3e) and address (``ip``, or the pool's lowest free one) chosen
    here, so two creations cannot take the same. Any refusal stores neither."""
    if db.execute("SELECT 1 FROM instances WHERE name=?", (name,)).fetchone():
        raise DuplicateVolume(f"instance {name!r} exists",
                              hint="choose another name, or destroy it first")
    volume, _ = cloud_volumes.create(db, volume_id=new_volume_id(), name=f"{name}-disk",
                                     size=disk, image=image, tenant=tenant, now=now)
    macs, ips = used_addresses(db)
    nic = InstanceNic(new_mac(macs), pick_ip(pool, ips, ip))
    instance = Instance(id=new_instance_id(), name=name, memory=memory, vcpus=vcpus,
                        volume=volume.id, image=image, tenant=tenant, ssh_keys=ssh_keys,
                        nics=(nic,), resources=resources or Resources())
    return create(db, instance, now)


# -- an instance's disk through the volumes API ----------------------------------------------

def _disk_of(db: sqlite3.Connection, volume_name: str) -> Instance | None:
    row = db.execute("SELECT i.name FROM instances i JOIN volumes v ON v.id=i.volume "
                     "WHERE v.name=?", (volume_name,)).fetchone()
    return by_name(db, row[0]) if row else None


def detach_volume(db: sqlite3.Connection, name: str, node: str, now: float, *,
                  force: bool = False) -> tuple[Volume, int]:
    """``volumes.detach``, but not an instance's disk from the dom0 holding its claim (the
    guest runs on it there), unless ``force`` (an admin fencing a dom0 that is gone)."""
    owner_of = _disk_of(db, name)
    mac = cloud_volumes.resolve_node(db, node)
    if (owner_of is not None and owner_of.claim is not None and not force
            and owner_of.claim.node == mac):
        raise VolumeInUse(f"volume {name} is the disk of instance {owner_of.name}, which "
                          f"holds its claim on {node}",
                          hint=f"'configserver instance stop {owner_of.name}' detaches it")
    return cloud_volumes.detach(db, name=name, node=node, now=now, force=force)


def delete_volume(db: sqlite3.Connection, name: str, now: float) -> tuple[Volume, int]:
    """``volumes.delete``, but not an instance's disk while the instance exists."""
    owner_of = _disk_of(db, name)
    if owner_of is not None:
        raise VolumeInUse(f"volume {name} is the disk of instance {owner_of.name}",
                          hint=f"'configserver instance destroy {owner_of.name} --delete-disk'")
    return cloud_volumes.delete(db, name=name, now=now)


def _existing(db: sqlite3.Connection, name: str, expect: str | None = None) -> Instance:
    """Instance ``name``; with ``expect``, only if it is still the one of that id (the API
    checked the caller's tenant on it: a namesake made since is not the caller's)."""
    found = by_name(db, name)
    if found is None or (expect is not None and found.id != expect):
        raise NotFound(f"no instance {name!r}", hint="see 'configserver instance list'")
    return found


def dom0s(db: sqlite3.Connection) -> list[Dom0]:
    """Every dom0 as the scheduler sees it: ready, drained, free memory last reported."""
    rows = db.execute("SELECT n.mac, n.hostname, n.state, n.drained, r.facts FROM nodes n "
                      "LEFT JOIN dom0_reports r ON r.mac=n.mac WHERE n.role='dom0'").fetchall()
    return [Dom0(r["mac"], r["hostname"],
                 free_memory(json.loads(r["facts"]) if r["facts"] else None),
                 ready=r["state"] == NodeState.READY, drained=r["drained"] is not None)
            for r in rows]


def start(db: sqlite3.Connection, name: str, node: str | None,
          now: float, expect: str | None = None) -> tuple[Instance, int]:
    """Instance ``name`` wanted running on dom0 ``node`` (a hostname or MAC), or where the
    scheduler puts it (``node`` None: the dom0 holding its claim if one does). The claim is
    handed over in this one write; ClaimHeld if another dom0 holds it."""
    current = _existing(db, name, expect)
    if current.failover is not None:  # its disk must stay away from the lost dom0
        raise Conflict(f"instance {name} is being failed over: "
                       f"{current.failover.reason or 'it restarts elsewhere by itself'}",
                       hint=f"see 'configserver instance show {name}'")
    if node is not None:
        mac = cloud_volumes.dom0(db, node)
    elif current.claim is not None:
        mac = current.claim.node
    else:
        if current.desired == Desired.DESTROYED:
            claim(current, "")  # raises: it is being destroyed
        mac = choose(ceiling(current), dom0s(db),
                     [i for i in load_all(db) if i.id != current.id])
    if current.claim is None:
        _disk_not_in_use(db, current)
    started = claim(current, mac)
    if started == current:
        # Already wanted running there: its disk attached there again if it was taken away
        # (an admin's force detach); VolumeInUse if it is attached elsewhere meanwhile.
        volume_follows(db, current, mac, now, attach=True)
        return current, generation(db)
    started = replace(started, updated=now, desired_generation=generation(db) + 1)
    volume_follows(db, started, mac, now, attach=True)
    save(db, started)
    event(db, started, "start.requested", now, node=mac, epoch=started.claim.epoch
          if started.claim else None)
    return started, bump(db)


def _disk_not_in_use(db: sqlite3.Connection, instance: Instance) -> None:
    """VolumeInUse if the disk of an instance that no dom0 runs is attached somewhere (an
    admin looking at it): a guest must not boot on an array somebody else has open."""
    row = (db.execute("SELECT name FROM volumes WHERE id=?", (instance.volume,)).fetchone()
           if instance.volume else None)
    volume = cloud_volumes.by_name(db, row["name"]) if row else None
    held = [a for a in volume.attachments if not a.detaching] if volume else []
    if held:
        where = ", ".join(cloud_volumes.label(db, a.node) for a in held)
        raise VolumeInUse(f"the disk of instance {instance.name} ({volume.name}) is attached "
                          f"to {where} by hand", hint=f"'configserver volume detach "
                          f"{volume.name} {where}' first")


def set_resources(db: sqlite3.Connection, name: str, changes: dict[str, Any], now: float,
                  expect: str | None = None) -> tuple[Instance, int]:
    """Instance ``name``'s memory and resource controls changed (``resources.updated``); its
    dom0 applies them to the running guest. Memory changes while it runs only within the
    ceiling it was started with (``max_memory``)."""
    current = _existing(db, name, expect)
    running = current.claim is not None
    memory = current.memory
    if "memory" in changes:
        memory = validate_memory(changes["memory"])
        ceiling = current.resources.max_memory
        if running and memory != current.memory and not ceiling:
            raise Conflict(f"instance {name} runs without a memory ceiling: its memory "
                           "changes once it is stopped", hint="set max_memory at create")
    resources = updated(current.resources, {k: v for k, v in changes.items() if k != "memory"},
                        memory=memory, vcpus=current.vcpus, running=running)
    changed = replace(current, memory=memory, resources=resources, updated=now)
    if changed == replace(current, updated=now):
        return current, generation(db)
    save(db, changed)
    event(db, changed, "resources.changed", now, memory=memory, **resources.to_json())
    return changed, bump(db)


def reboot(db: sqlite3.Connection, name: str, now: float,
           expect: str | None = None) -> tuple[Instance, int]:
    """A reboot of running instance ``name``: its dom0 reboots the guest (same claim)."""
    current = _existing(db, name, expect)
    if current.desired != Desired.RUNNING or current.claim is None:
        raise Conflict(f"instance {name} is {current.desired}: only a running instance "
                       "reboots", hint=f"'configserver instance start {name}'")
    rebooting = replace(current, reboots=current.reboots + 1, updated=now)
    save(db, rebooting)
    event(db, rebooting, "reboot.requested", now, reboot=rebooting.reboots)
    return rebooting, bump(db)


def destroy(db: sqlite3.Connection, name: str, now: float, *,
            delete_disk: bool, expect: str | None = None) -> tuple[Instance, int]:
    """Instance ``name`` destroyed: at once if no dom0 holds its claim, else once the holder
    (which stops the guest hard) reports it gone. Its volume stays unless ``delete_disk``.
    The returned instance has no claim if it is gone already."""
    current = _existing(db, name, expect)
    doomed = replace(current, desired=Desired.DESTROYED, updated=now,
                     delete_disk=current.delete_disk or delete_disk,
                     desired_generation=generation(db) + 1)
    event(db, doomed, "destroy.requested", now, delete_disk=doomed.delete_disk)
    if doomed.claim is None:
        forget(db, doomed, now)
    else:
        save(db, doomed)
    return doomed, bump(db)


def forget(db: sqlite3.Connection, instance: Instance, now: float) -> None:
    """The instance's row gone (its NICs and addresses freed, its timeline and usage samples
    kept, its final totals on the ``destroyed`` event); its volume deleted if asked: any
    attachment left is revoked at once, as no guest uses it now."""
    db.execute("DELETE FROM instances WHERE id=?", (instance.id,))
    _sample(db, instance, now, force=True)
    event(db, instance, "destroyed", now, usage=totals(instance.usage))
    row = (db.execute("SELECT name FROM volumes WHERE id=?", (instance.volume,)).fetchone()
           if instance.volume else None)
    if row is None or not instance.delete_disk:
        return
    volume = cloud_volumes.by_name(db, row["name"])
    for attachment in volume.attachments if volume else ():
        cloud_volumes.detach(db, name=row["name"], node=attachment.node, now=now, force=True)
    cloud_volumes.delete(db, name=row["name"], now=now)


def stop(db: sqlite3.Connection, name: str, now: float,
         expect: str | None = None) -> tuple[Instance, int]:
    """Instance ``name`` wanted stopped; its claim stays until the holder reports it gone."""
    current = _existing(db, name, expect)
    if current.desired != Desired.RUNNING:
        return current, generation(db)
    stopping = replace(current, desired=Desired.STOPPED, updated=now,
                       desired_generation=generation(db) + 1)
    save(db, stopping)
    event(db, stopping, "stop.requested", now)
    return stopping, bump(db)


def gone(db: sqlite3.Connection, name: str, node: str, epoch: int,
         now: float) -> tuple[Instance, int]:
    """Dom0 ``node`` reported the domain of ``epoch`` gone: the claim released if it was
    the current one and the instance is wanted stopped (else nothing changes)."""
    current = _existing(db, name)
    released = release(current, node, epoch)
    if released == current:
        return current, generation(db)
    released = replace(released, updated=now)
    volume_follows(db, released, node, now, attach=False)
    save(db, released)
    event(db, released, "claim.released", now, node=node, epoch=epoch)
    if released.desired == Desired.DESTROYED:
        forget(db, released, now)
    return released, bump(db)


def record_report(db: sqlite3.Connection, mac: str, report: dict[str, Any],
                  now: float, seen: int | None = None) -> ReportOutcome:
    """A node's report (following the work of generation ``seen``): the volumes' part
    (``volumes.record_report``), then for a dom0 its guests and Xen facts. The guests' part
    is parsed before anything is written, so a malformed report stores nothing."""
    body = report.get("dom0") if isinstance(report.get("dom0"), dict) else None
    xen, guests, reported = parse_guests(body) if body is not None else (None, [], [])
    moves = parse_reports(body.get("migrations")) if body is not None else []
    outcome = cloud_volumes.record_report(db, mac=mac, report=report, now=now)
    node = owner(db, mac)
    if "storage" in report and node is not None:
        from configserver.registry import failover  # it builds on this module

        failover.storage_report(db, node, parse_storage(report["storage"]), seen, now)
    if body is None or node is None:
        return outcome
    if xen is not None:
        db.execute("INSERT OR REPLACE INTO dom0_reports VALUES (?,?,?)",
                   (node, _encode(xen), now))
    everything = load_all(db)
    held = _held(everything, node)
    by_domain = {i.domain: i for i in everything}
    for item in reported:
        stage = str(item.get("stage"))[:40]
        detail = {k[:40]: str(v)[:300] for k, v in list(item.items())[:20]
                  if k not in _NOT_DETAIL}
        if isinstance(item.get("time"), int | float) and not isinstance(item["time"], bool):
            detail["at"] = round(float(item["time"]), 3)  # when the dom0 did it
        instance = by_domain.get(str(item.get("domain")))
        if instance is not None:  # also what a dom0 without its claim did to a domain of it
            event(db, instance, f"agent.{stage}", now, node=node, **detail)
        if instance not in held:  # not this dom0's guest: on the node's own timeline too
            node_events.add(db, node, f"guest.{stage}", detail, now)
    from configserver.registry import migrations  # it builds on this module

    changed = migrations.apply_reports(db, node, moves, now)
    if changed:
        everything = load_all(db)
        held = _held(everything, node)
    for changed_one, stages, released in apply_guests(held, node, guests, seen):
        instance = replace(changed_one, updated=now)
        save(db, instance)
        _sample(db, instance, now)
        for stage in stages:
            event(db, instance, stage, now, node=node)
        if released and instance.claim is not None:
            gone(db, instance.name, node, instance.claim.epoch, now)
        changed += 1
    current = bump(db) if changed else outcome.generation
    return ReportOutcome(current, outcome.changed + changed, outcome.ignored)


def _held(instances: Sequence[Instance], node: str) -> list[Instance]:
    """The instances whose claim ``node`` holds and whose guests' reports count: not one
    being failed over (its dom0 was lost; what it says now moves nothing)."""
    return [i for i in instances if i.claim is not None and i.claim.node == node
            and i.failover is None]


# -- usage over time ----------------------------------------------------------------------

def _sample(db: sqlite3.Connection, instance: Instance, now: float, *,
            force: bool = False) -> None:
    """A sample of the instance's totals, unless its last is younger than USAGE_SAMPLE or
    says the same; samples older than USAGE_KEPT go."""
    current = totals(instance.usage)
    last = db.execute("SELECT time, totals FROM instance_usage WHERE instance=? "
                      "ORDER BY time DESC LIMIT 1", (instance.id,)).fetchone()
    if last is not None and (json.loads(last["totals"]) == current
                             or (not force and now - last["time"] < USAGE_SAMPLE)):
        return
    db.execute("INSERT INTO instance_usage VALUES (?,?,?)",
               (instance.id, now, _encode(current)))
    db.execute("DELETE FROM instance_usage WHERE instance=? AND time<?",
               (instance.id, now - USAGE_KEPT))


def usage(db: sqlite3.Connection, name: str, since: float | None,
          now: float) -> dict[str, Any]:
    """Instance ``name``'s usage since ``since`` (None: since it was created): its totals now
    less those of the newest sample at or before ``since`` (none: nothing was counted yet)."""
    instance = _existing(db, name)
    current = totals(instance.usage)
    base = {k: 0 for k in current}
    start = instance.created  # what the answer covers when no sample is at or before since
    if since is not None and since > instance.created:
        row = db.execute("SELECT time, totals FROM instance_usage WHERE instance=? AND "
                         "time<=? ORDER BY time DESC LIMIT 1", (instance.id, since)).fetchone()
        if row is not None:
            base, start = json.loads(row["totals"]), row["time"]
    grown = {k: v - (base.get(k) or 0) for k, v in current.items()}
    grown["cpu_seconds"] = round(grown["cpu_seconds"], 3)
    return {"instance": instance.name, "id": instance.id, "since": start, "until": now,
            "usage": grown, "total": current}


def dom0_facts(db: sqlite3.Connection, mac: str) -> dict[str, Any] | None:
    row = db.execute("SELECT facts FROM dom0_reports WHERE mac=?", (mac,)).fetchone()
    return json.loads(row[0]) if row else None


__all__ = ["by_name", "create", "create_with_disk", "delete_volume",
           "destroy", "detach_volume", "dom0_facts", "dom0s", "events", "forget", "gone",
           "load_all", "nic",
           "reboot", "record_report", "save", "set_resources", "start", "stop", "usage",
           "used_addresses", "volume_follows"]
