"""What storage and dom0 agents report (``POST /api/v1/agent/report``), parsed and applied
to the volumes' actual state (pure: volumes in, changed volumes and timeline events out).

Parsing checks the shape and refuses the whole report (InvalidReport) on any mistake, so a
malformed report stores nothing. Fields the contract does not name are ignored (agents may
add some). Applying records only changes: a report that repeats the last one adds nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from configserver.cloud.model import (
    Attachment,
    Redundancy,
    Volume,
    VolumeEvent,
    VolumeState,
    validate_volume_id,
)
from configserver.errors import InvalidMac, InvalidReport, InvalidVolumeName
from configserver.model import normalize_mac

log = logging.getLogger(__name__)

EXPORT_STATES = ("exported", "creating", "error")
# ``standby``: a migration's target, legs logged in, array not assembled (the source runs
# it); ``released``: a migration's source that stopped the array for the target.
DOM0_STATES = ("attaching", "attached", "degraded", "resyncing", "error", "standby",
               "released")
MEMBER_STATES = ("active", "faulty", "missing", "rebuilding")
DISK_STATES = ("ours", "empty", "foreign")
RESYNC_STEP = 10.0  # percent: the timeline records resync progress in steps of this much
MAX_TEXT = 1000


@dataclass(frozen=True)
class ExportReport:
    volume: str
    state: str
    error: str | None = None
    sessions: tuple[str, ...] = ()
    progress: float | None = None
    acls: tuple[str, ...] | None = None  # the initiators LIO lets in (None: not reported)


@dataclass(frozen=True)
class StorageReport:
    vg: dict[str, Any] | None
    disks: tuple[dict[str, Any], ...]
    exports: tuple[ExportReport, ...]
    removed: tuple[str, ...]
    orphans: tuple[str, ...]

    def facts(self) -> dict[str, Any]:
        """What placement needs of this report (kept as the node's latest storage facts)."""
        return {"vg": self.vg, "disks": list(self.disks), "orphans": list(self.orphans)}


@dataclass(frozen=True)
class AttachmentReport:
    volume: str
    state: str
    device: str | None = None
    created: bool = False
    sync: dict[str, Any] | None = None
    legs: tuple[tuple[str, str], ...] = ()  # (storage MAC, member state)
    error: str | None = None


@dataclass(frozen=True)
class Dom0Report:
    initiator: str | None
    attachments: tuple[AttachmentReport, ...]
    detached: tuple[str, ...]


@dataclass(frozen=True)
class Ingested:
    """What a report changed: volumes to store, volumes gone, timeline events, whether
    another node's work changed (bump the generation), and the volume ids ignored."""

    changed: tuple[Volume, ...] = ()
    gone: tuple[str, ...] = ()
    events: tuple[VolumeEvent, ...] = ()
    bump: bool = False
    ignored: tuple[str, ...] = ()


# -- parsing --------------------------------------------------------------------------------

def _fail(where: str, what: str) -> InvalidReport:
    return InvalidReport(f"report: {where} {what}", hint="see docs/api.md, agent report")


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, "must be a JSON object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(where, "must be a list")
    return value


def _text(value: Any, where: str, *, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise _fail(where, f"must be a string (at most {MAX_TEXT} characters)")
    return value


def _number(value: Any, where: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise _fail(where, "must be a number of at least 0")
    return value


def _choice(value: Any, where: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise _fail(where, "must be one of " + ", ".join(choices))
    return str(value)


def _volume_id(value: Any, where: str) -> str:
    try:
        return validate_volume_id(value)
    except InvalidVolumeName:
        raise _fail(where, "must be a volume id (16 hex digits)") from None


def parse_storage(data: Any) -> StorageReport:
    data = _obj(data, "storage")
    vg = data.get("vg")
    if vg is not None:
        vg = _obj(vg, "storage.vg")
        vg = {"name": _text(vg.get("name"), "storage.vg.name"),
              "size": _number(vg.get("size"), "storage.vg.size"),
              "free": _number(vg.get("free"), "storage.vg.free")}
    disks = []
    for i, item in enumerate(_list(data.get("disks"), "storage.disks")):
        disk = _obj(item, f"storage.disks[{i}]")
        disks.append({"path": _text(disk.get("path"), f"storage.disks[{i}].path",
                                    optional=False),
                      "size": _number(disk.get("size"), f"storage.disks[{i}].size"),
                      "state": _choice(disk.get("state"), f"storage.disks[{i}].state",
                                       DISK_STATES)})
    exports = []
    for i, item in enumerate(_list(data.get("exports"), "storage.exports")):
        where = f"storage.exports[{i}]"
        entry = _obj(item, where)
        sessions = _list(entry.get("sessions"), f"{where}.sessions")
        exports.append(ExportReport(
            volume=_volume_id(entry.get("volume"), f"{where}.volume"),
            state=_choice(entry.get("state"), f"{where}.state", EXPORT_STATES),
            error=_text(entry.get("error"), f"{where}.error"),
            sessions=tuple(str(_text(s, f"{where}.sessions", optional=False))
                           for s in sessions),
            progress=_number(entry.get("progress"), f"{where}.progress", optional=True),
            acls=None if entry.get("acls") is None else tuple(
                str(_text(a, f"{where}.acls", optional=False))
                for a in _list(entry.get("acls"), f"{where}.acls"))))
    removed = tuple(_volume_id(v, "storage.removed[]")
                    for v in _list(data.get("removed"), "storage.removed"))
    orphans = tuple(str(_text(v, "storage.orphans[]", optional=False))
                    for v in _list(data.get("orphans"), "storage.orphans"))
    return StorageReport(vg, tuple(disks), tuple(exports), removed, orphans)


def parse_dom0(data: Any) -> Dom0Report:
    data = _obj(data, "dom0")
    attachments = []
    for i, item in enumerate(_list(data.get("attachments"), "dom0.attachments")):
        where = f"dom0.attachments[{i}]"
        entry = _obj(item, where)
        sync = entry.get("sync")
        if sync is not None:
            sync = _obj(sync, f"{where}.sync")
            sync = {"action": _text(sync.get("action"), f"{where}.sync.action"),
                    "percent": _number(sync.get("percent"), f"{where}.sync.percent",
                                       optional=True)}
        legs = []
        for j, item_leg in enumerate(_list(entry.get("legs"), f"{where}.legs")):
            leg = _obj(item_leg, f"{where}.legs[{j}]")
            try:
                node = normalize_mac(str(leg.get("node", "")))
            except InvalidMac:
                raise _fail(f"{where}.legs[{j}].node", "must be a MAC") from None
            legs.append((node, _choice(leg.get("state"), f"{where}.legs[{j}].state",
                                       MEMBER_STATES)))
        created = entry.get("created", False)
        if not isinstance(created, bool):
            raise _fail(f"{where}.created", "must be true or false")
        attachments.append(AttachmentReport(
            volume=_volume_id(entry.get("volume"), f"{where}.volume"),
            state=_choice(entry.get("state"), f"{where}.state", DOM0_STATES),
            device=_text(entry.get("device"), f"{where}.device"), created=created,
            sync=sync, legs=tuple(legs), error=_text(entry.get("error"), f"{where}.error")))
    detached = tuple(_volume_id(v, "dom0.detached[]")
                     for v in _list(data.get("detached"), "dom0.detached"))
    return Dom0Report(_text(data.get("initiator"), "dom0.initiator"), tuple(attachments),
                      detached)


# -- applying -------------------------------------------------------------------------------

def redundancy_of(volume: Volume) -> Redundancy:
    """From the dom0's view if one reports the array, else from the storage legs."""
    for attachment in volume.attachments:
        if attachment.detaching or attachment.state not in ("attached", "degraded",
                                                             "resyncing"):
            continue
        if attachment.state == "degraded":
            return Redundancy.DEGRADED
        if attachment.state == "resyncing":
            return Redundancy.RESYNCING
        members = [leg.member for leg in volume.legs]
        if all(m == "active" for m in members):
            return Redundancy.REDUNDANT
        if any(m == "rebuilding" for m in members):
            return Redundancy.RESYNCING
        if any(m in ("faulty", "missing") for m in members):
            return Redundancy.DEGRADED
    exported = sum(leg.state == "exported" for leg in volume.legs)
    if volume.state == VolumeState.DELETING or exported == 0:
        return Redundancy.UNKNOWN
    return Redundancy.REDUNDANT if exported == len(volume.legs) else Redundancy.DEGRADED


class _Changes:
    def __init__(self, now: float) -> None:
        self.now = now
        self.events: list[VolumeEvent] = []
        self.bump = False

    def event(self, volume: Volume, stage: str, **detail: Any) -> None:
        self.events.append(VolumeEvent(volume.id, self.now, stage,
                                       {k: v for k, v in detail.items() if v is not None}))

    def settle(self, before: Volume, after: Volume) -> Volume:
        """``after`` with its state and redundancy derived again, and their events."""
        state, error = after.state, after.error
        exported = all(leg.state == "exported" for leg in after.legs)
        if state in (VolumeState.CREATING, VolumeState.ERROR) and exported:
            state, error = VolumeState.READY, None
        elif state == VolumeState.CREATING:
            failed = next((g for g in after.legs if g.state == "error"), None)
            if failed is not None:
                state, error = VolumeState.ERROR, f"leg on {failed.node}: {failed.error}"
        after = replace(after, state=state, error=error)
        after = replace(after, redundancy=redundancy_of(after))
        if after.state != before.state:
            self.event(after, "state", **{"from": str(before.state), "to": str(after.state),
                                          "error": after.error})
        if after.redundancy != before.redundancy:
            self.event(after, "redundancy", **{"from": str(before.redundancy),
                                               "to": str(after.redundancy)})
        if after != before:
            after = replace(after, updated=self.now)
        return after


def apply_storage(volumes: Sequence[Volume], mac: str, report: StorageReport,
                  now: float) -> Ingested:
    """A storage node's report applied to the volumes with a leg on it."""
    changes = _Changes(now)
    exports = {e.volume: e for e in report.exports}
    mine = {v.id: v for v in volumes if v.leg(mac) is not None}
    changed, gone = [], []
    for volume in mine.values():
        leg = volume.leg(mac)
        assert leg is not None
        new = leg
        if volume.id in report.removed and volume.state == VolumeState.DELETING:
            new = replace(leg, state="removed", error=None)
        elif volume.id in exports and volume.state != VolumeState.DELETING:
            entry = exports[volume.id]
            new = replace(leg, state=entry.state,
                          error=entry.error if entry.state == "error" else None)
        elif volume.state != VolumeState.DELETING and leg.state in ("exported", "creating"):
            new = replace(leg, state="pending", error=None)  # no longer there (a reboot)
        if new == leg:
            continue
        stage = "leg.missing" if new.state == "pending" else f"leg.{new.state}"
        changes.event(volume, stage, node=mac, error=new.error)
        if (leg.state == "exported") != (new.state == "exported"):
            changes.bump = True  # the dom0's attachment may come or go
        updated = volume.with_leg(new)
        if all(g.state == "removed" for g in updated.legs):
            gone.append(volume.id)
            changes.bump = True
            log.info("volume %s (%s) deleted: both legs removed (last by %s)", volume.name,
                     volume.id, mac)
            continue
        changed.append(changes.settle(volume, updated))
    ignored = sorted({*exports, *report.removed} - set(mine))
    return Ingested(tuple(changed), tuple(gone), tuple(changes.events), changes.bump,
                    tuple(ignored))


def _resync_step(sync: dict[str, Any] | None) -> float | None:
    percent = (sync or {}).get("percent")
    return None if percent is None else float(percent) // RESYNC_STEP * RESYNC_STEP


def _apply_attachment(changes: _Changes, volume: Volume, mac: str, current: Attachment,
                      entry: AttachmentReport) -> Volume:
    new = replace(current, state=current.state if current.detaching else entry.state,
                  device=entry.device, sync=entry.sync, error=entry.error)
    if new.state != current.state or new.error != current.error:
        changes.event(volume, f"dom0.{new.state}", node=mac, device=new.device,
                      error=new.error)
    if new.state == "resyncing" and (_resync_step(new.sync) != _resync_step(current.sync)
                                     or current.state != "resyncing"):
        changes.event(volume, "resync", node=mac, **(new.sync or {}))
    updated = volume.with_attachment(new, mac)
    # Only a dom0 running the array knows its legs' states (not a migration's either side).
    members = {} if entry.state in ("standby", "released") else dict(entry.legs)
    for leg in volume.legs:
        member = members.get(leg.node)
        if member is not None and member != leg.member:
            changes.event(volume, f"member.{member}", node=leg.node, dom0=mac)
            updated = updated.with_leg(replace(leg, member=member))
    if entry.created and not volume.initialized:
        changes.event(volume, "initialized", node=mac, device=entry.device)
        updated = replace(updated, initialized=True)
        changes.bump = True  # its work's "create" turns false
    return updated


def apply_dom0(volumes: Sequence[Volume], mac: str, report: Dom0Report,
               now: float) -> Ingested:
    """A dom0's report applied to the volumes attached (or detaching) there."""
    changes = _Changes(now)
    entries = {a.volume: a for a in report.attachments}
    mine = {v.id: v for v in volumes if v.attachment(mac) is not None}
    changed = []
    for volume in mine.values():
        current = volume.attachment(mac)
        assert current is not None
        entry = entries.get(volume.id)
        if current.detaching and entry is None:
            # Detached (or never attached, or gone with a reboot): the map is updated last.
            updated = volume.with_attachment(None, mac)
            if not updated.attachments:  # else the dom0 left running it reports them
                updated = replace(updated, legs=tuple(replace(g, member=None)
                                                      for g in updated.legs))
            changes.event(volume, "detached", node=mac)
            changes.bump = True  # the targets' ACLs drop this initiator
        elif entry is None:
            if current.state == "requested":
                continue
            updated = volume.with_attachment(
                replace(current, state="requested", device=None, sync=None, error=None), mac)
            changes.event(volume, "dom0.requested", node=mac,
                          reason="detached" if volume.id in report.detached else "not reported")
        else:
            updated = _apply_attachment(changes, volume, mac, current, entry)
        if updated != volume:
            changed.append(changes.settle(volume, updated))
    ignored = sorted(set(entries) - set(mine))
    return Ingested(tuple(changed), (), tuple(changes.events), changes.bump, tuple(ignored))


__all__ = ["AttachmentReport", "Dom0Report", "ExportReport", "Ingested", "StorageReport",
           "apply_dom0", "apply_storage", "parse_dom0", "parse_storage", "redundancy_of"]
