"""Volumes in SQLite: desired-state writes (validated inside their transaction), the agents'
reports applied to actual state, timelines and the cloud generation.

Every write is one writer job (``writer.py``): it applies whole or raises, and then leaves
nothing behind. Each desired-state change bumps the generation in the same transaction; so
does a report that changes another node's work. The policy (placement, what a report means)
is ``configserver.cloud``'s; this only reads and writes rows.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from configserver.cloud import placement
from configserver.cloud.drain import holds
from configserver.cloud.model import (
    EXPORTED_STATES,
    Attachment,
    Leg,
    Redundancy,
    Volume,
    VolumeEvent,
    VolumeState,
)
from configserver.cloud.reports import (
    Ingested,
    apply_dom0,
    apply_storage,
    parse_dom0,
    parse_storage,
)
from configserver.errors import (
    Conflict,
    DuplicateVolume,
    InvalidMac,
    InvalidRequest,
    NodeDrained,
    NotADom0,
    NotFound,
    VolumeInUse,
)
from configserver.model import NodeState, normalize_mac
from configserver.registry import ReportOutcome
from configserver.registry.schema import owner

log = logging.getLogger(__name__)

GENERATION_KEY = "cloud_generation"
_encode = json.JSONEncoder(default=str, separators=(",", ":")).encode


# -- the generation -------------------------------------------------------------------------

def generation(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM settings WHERE key=?", (GENERATION_KEY,)).fetchone()
    return int(row[0]) if row else 0


def bump(db: sqlite3.Connection) -> int:
    new = generation(db) + 1
    db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (GENERATION_KEY, str(new)))
    return new


# -- reading --------------------------------------------------------------------------------

def _volume(row: sqlite3.Row, legs: Sequence[sqlite3.Row],
            attachments: Sequence[sqlite3.Row]) -> Volume:
    return Volume(
        id=row["id"], name=row["name"], size=row["size"], image=row["image"],
        tenant=row["tenant"], state=VolumeState(row["state"]), error=row["error"],
        initialized=bool(row["initialized"]), redundancy=Redundancy(row["redundancy"]),
        created=row["created"], updated=row["updated"],
        legs=tuple(Leg(g["node"], g["state"], g["error"], g["member"]) for g in legs),
        attachments=tuple(Attachment(a["node"], a["state"], a["device"],
                                     json.loads(a["sync"]) if a["sync"] else None,
                                     a["error"], bool(a["detaching"])) for a in attachments))


def load_all(db: sqlite3.Connection) -> list[Volume]:
    """Every volume, by name, with its legs and attachments."""
    legs: dict[str, list[sqlite3.Row]] = {}
    for row in db.execute("SELECT * FROM volume_legs ORDER BY volume, position"):
        legs.setdefault(row["volume"], []).append(row)
    attached: dict[str, list[sqlite3.Row]] = {}
    for row in db.execute("SELECT * FROM volume_attachments ORDER BY volume, node"):
        attached.setdefault(row["volume"], []).append(row)
    return [_volume(row, legs.get(row["id"], []), attached.get(row["id"], []))
            for row in db.execute("SELECT * FROM volumes ORDER BY name")]


def by_name(db: sqlite3.Connection, name: str) -> Volume | None:
    row = db.execute("SELECT * FROM volumes WHERE name=?", (name,)).fetchone()
    if row is None:
        return None
    legs = db.execute("SELECT * FROM volume_legs WHERE volume=? ORDER BY position",
                      (row["id"],)).fetchall()
    attached = db.execute("SELECT * FROM volume_attachments WHERE volume=? ORDER BY node",
                          (row["id"],)).fetchall()
    return _volume(row, legs, attached)


def events(db: sqlite3.Connection, volume_id: str, limit: int = 500) -> list[VolumeEvent]:
    rows = db.execute(
        "SELECT * FROM (SELECT * FROM volume_events WHERE volume=? ORDER BY id DESC LIMIT ?) "
        "ORDER BY id", (volume_id, limit)).fetchall()
    return [VolumeEvent(r["volume"], r["time"], r["stage"], json.loads(r["detail"]))
            for r in rows]


def storage_facts(db: sqlite3.Connection, mac: str) -> dict[str, Any] | None:
    row = db.execute("SELECT facts FROM storage_reports WHERE mac=?", (mac,)).fetchone()
    return json.loads(row[0]) if row else None


# -- writing --------------------------------------------------------------------------------

def add_event(db: sqlite3.Connection, event: VolumeEvent) -> None:
    db.execute("INSERT INTO volume_events (volume, time, stage, detail) VALUES (?,?,?,?)",
               (event.volume, event.time, event.stage, _encode(event.detail)))


def _event(db: sqlite3.Connection, volume: Volume, stage: str, now: float,
           **detail: Any) -> None:
    add_event(db, VolumeEvent(volume.id, now, stage, detail))


def save(db: sqlite3.Connection, volume: Volume) -> None:
    """Insert or replace the volume with its legs and attachments."""
    db.execute(
        "INSERT INTO volumes (id, name, size, image, tenant, state, error, initialized,"
        " redundancy, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO "
        "UPDATE SET state=excluded.state, error=excluded.error,"
        " initialized=excluded.initialized, redundancy=excluded.redundancy,"
        " updated=excluded.updated",
        (volume.id, volume.name, volume.size, volume.image, volume.tenant, str(volume.state),
         volume.error, int(volume.initialized), str(volume.redundancy), volume.created,
         volume.updated))
    db.execute("DELETE FROM volume_legs WHERE volume=?", (volume.id,))
    db.executemany("INSERT INTO volume_legs VALUES (?,?,?,?,?,?)",
                   [(volume.id, g.node, i, g.state, g.error, g.member)
                    for i, g in enumerate(volume.legs)])
    db.execute("DELETE FROM volume_attachments WHERE volume=?", (volume.id,))
    db.executemany("INSERT INTO volume_attachments VALUES (?,?,?,?,?,?,?)",
                   [(volume.id, a.node, a.state, a.device,
                     _encode(a.sync) if a.sync is not None else None, a.error,
                     int(a.detaching)) for a in volume.attachments])


def forget(db: sqlite3.Connection, volume_id: str) -> None:
    """The volume is gone: its row, legs, attachments and timeline."""
    db.execute("DELETE FROM volumes WHERE id=?", (volume_id,))
    db.execute("DELETE FROM volume_events WHERE volume=?", (volume_id,))


def _storage_nodes(db: sqlite3.Connection
                   ) -> tuple[list[placement.StorageNode], list[str], list[str]]:
    """The ready storage nodes that are not drained, with their reported room, the labels
    of the others not ready, and those of the drained ones."""
    ready, others, drained = [], [], []
    for row in db.execute("SELECT n.mac, n.hostname, n.state, n.drained, r.facts FROM nodes "
                          "AS n LEFT JOIN storage_reports AS r ON r.mac = n.mac WHERE "
                          "n.role='storage' ORDER BY n.mac"):
        label = row["hostname"] or row["mac"]
        if row["drained"] is not None:
            drained.append(label)
            continue
        if row["state"] != str(NodeState.READY):
            others.append(f"{label} ({row['state']})")
            continue
        facts = json.loads(row["facts"]) if row["facts"] else None
        ready.append(placement.StorageNode(row["mac"], row["hostname"],
                                           placement.reported_free(facts)))
    return ready, others, drained


def create(db: sqlite3.Connection, volume_id: str, name: str, *, size: int,
           image: str | None, tenant: str | None, now: float) -> tuple[Volume, int]:
    """A new volume, placed on the two ready storage nodes with most room."""
    if db.execute("SELECT 1 FROM volumes WHERE name=?", (name,)).fetchone():
        raise DuplicateVolume(f"volume {name!r} exists",
                              hint="choose another name, or delete it first")
    nodes, not_ready, drained = _storage_nodes(db)
    first, second = placement.place(size, nodes, load_all(db), not_ready=not_ready,
                                    drained=drained)
    volume = Volume(id=volume_id, name=name, size=size, image=image, tenant=tenant,
                    created=now, updated=now, legs=(Leg(first), Leg(second)))
    save(db, volume)
    _event(db, volume, "created", now, size=size, image=image, tenant=tenant)
    _event(db, volume, "placed", now, legs=[first, second])
    return volume, bump(db)


def _existing(db: sqlite3.Connection, name: str) -> Volume:
    volume = by_name(db, name)
    if volume is None:
        raise NotFound(f"no volume {name!r}", hint="see 'configserver volume list'")
    return volume


def label(db: sqlite3.Connection, mac: str) -> str:
    """A node's hostname, or its MAC."""
    row = db.execute("SELECT hostname FROM nodes WHERE mac=?", (mac,)).fetchone()
    return (row["hostname"] if row and row["hostname"] else None) or mac


def delete(db: sqlite3.Connection, name: str, now: float) -> tuple[Volume, int]:
    volume = _existing(db, name)
    if volume.attachments:
        where = ", ".join(label(db, a.node) for a in volume.attachments)
        detaching = all(a.detaching for a in volume.attachments)
        raise VolumeInUse(
            f"volume {name} is {'still detaching from' if detaching else 'attached to'} "
            f"{where}", hint="wait for the dom0 to detach it" if detaching else
            f"detach it first ('configserver volume detach {name} {where}')")
    if volume.state == VolumeState.DELETING:
        return volume, generation(db)
    deleting = replace(volume, state=VolumeState.DELETING, error=None,
                       redundancy=Redundancy.UNKNOWN, updated=now)
    save(db, deleting)
    _event(db, volume, "delete.requested", now)
    return deleting, bump(db)


def resolve_node(db: sqlite3.Connection, ref: str) -> str | None:
    """The primary MAC of the node named by a MAC (any NIC) or its hostname."""
    try:
        found = owner(db, normalize_mac(ref))
    except InvalidMac:
        found = None
    if found is not None:
        return found
    row = db.execute("SELECT mac FROM nodes WHERE hostname=?", (ref.lower(),)).fetchone()
    return str(row[0]) if row else None


def dom0(db: sqlite3.Connection, ref: str) -> str:
    """The primary MAC of dom0 ``ref`` (hostname or MAC), if it may take volumes."""
    mac = resolve_node(db, ref)
    if mac is None:
        raise NotFound(f"no node {ref!r}", hint="name a dom0 by hostname or MAC "
                                                 "('configserver node list')")
    row = db.execute("SELECT role, drained FROM nodes WHERE mac=?", (mac,)).fetchone()
    if row["role"] != "dom0":
        raise NotADom0(f"{ref} is a {row['role'] or 'pending'} node, not a dom0",
                       hint="volumes attach to nodes of role dom0")
    if row["drained"] is not None:
        raise NodeDrained(f"{ref} is drained",
                          hint=f"attach it elsewhere, or 'configserver node undrain {ref}'")
    return mac


def attach(db: sqlite3.Connection, name: str, node: str, now: float, *,
           failover: bool = False) -> tuple[Volume, int]:
    """``name`` attached to dom0 ``node``; refused to a lost dom0 and, but for the failover's
    own restart (``failover``), while the volume is the disk of an instance failing over."""
    volume = _existing(db, name)
    mac = dom0(db, node)
    if volume.state not in EXPORTED_STATES:
        raise Conflict(f"volume {name} is {volume.state}: it cannot be attached")
    row = db.execute("SELECT state FROM nodes WHERE mac=?", (mac,)).fetchone()
    if row is not None and row["state"] == NodeState.LOST:
        raise Conflict(f"{label(db, mac)} is lost: no volume is attached to it",
                       hint="wait until it heartbeats again")
    if not failover and db.execute("SELECT 1 FROM instances WHERE volume=? AND failover IS "
                                   "NOT NULL", (volume.id,)).fetchone():
        raise VolumeInUse(f"volume {name} is the disk of an instance being failed over",
                          hint="it is attached where the instance restarts")
    current = volume.attachment(mac)
    if current is not None and not current.detaching:
        return volume, generation(db)  # already: nothing changes
    others = [a for a in volume.attachments if a.node != mac]
    if others:
        where = ", ".join(label(db, a.node) for a in others)
        if all(a.detaching for a in others):
            raise VolumeInUse(f"volume {name} is still detaching from {where}",
                              hint="wait for that dom0 to report it detached")
        raise VolumeInUse(f"volume {name} is attached to {where}: detach it from {where} "
                          "first", hint="a volume is attached to one dom0 at a time")
    attached = volume.with_attachment(Attachment(mac), mac)
    attached = replace(attached, updated=now)
    save(db, attached)
    _event(db, volume, "attach.requested", now, node=mac)
    return attached, bump(db)


def detach(db: sqlite3.Connection, name: str, node: str, now: float, *,
           force: bool = False) -> tuple[Volume, int]:
    """Take the volume from a dom0: in order (the dom0 stops its array, then the storage
    nodes drop its ACL), or with ``force`` at once (fencing: the storage nodes drop the ACL,
    and with it the dom0's sessions, without waiting for the dom0)."""
    volume = _existing(db, name)
    mac = resolve_node(db, node)
    current = volume.attachment(mac) if mac else None
    if current is None:
        raise NotFound(f"volume {name} is not attached to {node}",
                       hint=f"see 'configserver volume show {name}'")
    if force:
        revoked = replace(volume.with_attachment(None, current.node), updated=now)
        save(db, revoked)
        _event(db, volume, "access.revoked", now, node=current.node)
        return revoked, bump(db)
    if current.detaching:
        return volume, generation(db)
    detaching = volume.with_attachment(replace(current, state="detaching", detaching=True),
                                       current.node)
    detaching = replace(detaching, updated=now)
    save(db, detaching)
    _event(db, volume, "detach.requested", now, node=current.node)
    return detaching, bump(db)


def _held_moved(db: sqlite3.Connection, before: Sequence[Volume], outcome: Ingested) -> bool:
    """Whether the report changed which legs of drained storage nodes a dom0 holds (and so
    which exports those nodes keep: their work)."""
    drained = {r[0] for r in db.execute(
        "SELECT mac FROM nodes WHERE drained IS NOT NULL AND role='storage'")}
    if not drained or not outcome.changed:
        return False
    after = {v.id: v for v in before}
    after.update((v.id, v) for v in outcome.changed)

    def held(volumes: Sequence[Volume]) -> set[tuple[str, str]]:
        return {(v.id, g.node) for v in volumes for g in v.legs
                if g.node in drained and holds(v, g)}

    return held(before) != held([after[v] for v in after if v not in outcome.gone])


def record_report(db: sqlite3.Connection, mac: str, report: dict[str, Any],
                  now: float) -> ReportOutcome:
    """Apply an agent's report (``{"storage": ...}`` or ``{"dom0": ...}``) to actual state.

    Parsed first: a malformed report raises InvalidReport and stores nothing.
    """
    node = owner(db, mac)
    if node is None:
        raise NotFound(f"no node with MAC {mac}")
    if ("storage" in report) == ("dom0" in report):
        raise InvalidRequest("a report has either 'storage' or 'dom0'")
    volumes = load_all(db)
    outcome: Ingested
    if "storage" in report:
        storage = parse_storage(report["storage"])
        outcome = apply_storage(volumes, node, storage, now)
        db.execute("INSERT OR REPLACE INTO storage_reports VALUES (?,?,?)",
                   (node, _encode(storage.facts()), now))
    else:
        outcome = apply_dom0(volumes, node, parse_dom0(report["dom0"]), now)
    for volume in outcome.changed:
        save(db, volume)
    for event in outcome.events:
        add_event(db, event)
    for volume_id in outcome.gone:
        forget(db, volume_id)
    if outcome.ignored:
        log.warning("%s: report about volumes it has no business with ignored: %s", node,
                    ", ".join(outcome.ignored))
    moved = outcome.bump or _held_moved(db, volumes, outcome)
    current = bump(db) if moved else generation(db)
    return ReportOutcome(current, len(outcome.changed) + len(outcome.gone), outcome.ignored)


__all__ = ["GENERATION_KEY", "attach", "bump", "by_name", "create",
           "delete", "detach", "events", "generation", "label", "load_all", "record_report",
           "resolve_node", "storage_facts"]
