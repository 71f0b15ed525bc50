"""Live migration of an instance between two dom0s, as desired state (pure).

A migration is a record on the instance, driven by the two dom0s' reports through phases:

1. ``preparing``: the target logs in to the volume's legs without assembling the array
   (``standby``), makes a placeholder device for the guest's disk and starts a receiver that
   lets only the source node in (``nodeagent.migratestream``); it reports ``listening`` with
   its port.
2. ``sending``: the source runs ``xl migrate -p`` into that receiver. The guest runs on the
   source through the live phase and is paused on the target at the end. The source then
   takes its device off the array and stops the array, and reports ``released``.
3. ``released``: the target assembles the array, points the placeholder at it and unpauses
   the guest; it reports ``running``.
4. Done: the claim moves to the target (the epoch reserved at the start), the source's
   attachment goes, the record is cleared. The map changes only here, after both sides
   finished.

The array is never active on two dom0s: the target assembles it only after the source stopped
it. A failure before ``released`` (the source reports ``failed``: xl resumed the guest there)
aborts: the target drops what it prepared and the guest runs on where it was. The claim stays
with the source until the end, so the source's agent is the only one that may run the guest
until the target reports it running under the new epoch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from typing import Any

from configserver.errors import InvalidReport

PREPARING, SENDING, RELEASED = "preparing", "sending", "released"
PHASES = (PREPARING, SENDING, RELEASED)
# What each side reports of a migration (``dom0.migrations`` in its report).
TARGET_STATES = ("preparing", "listening", "received", "running", "failed")
SOURCE_STATES = ("sending", "released", "failed")


@dataclass(frozen=True)
class Migration:
    id: str
    source: str  # MAC of the dom0 the guest leaves
    target: str  # MAC of the dom0 it goes to
    epoch: int  # the claim's epoch on the target once it arrives
    phase: str = PREPARING
    started: float = 0.0
    port: int | None = None  # the target's receiver, once listening
    steps: tuple[tuple[str, float], ...] = field(default=())  # (what, when): progress

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "target": self.target,
                "epoch": self.epoch, "phase": self.phase, "started": self.started,
                "port": self.port, "steps": [{"step": s, "time": t} for s, t in self.steps]}


def new_migration(source: str, target: str, epoch: int, now: float) -> Migration:
    return Migration(secrets.token_hex(8), source, target, epoch, PREPARING, now,
                     steps=(("requested", now),))


def from_json(data: dict[str, Any] | None) -> Migration | None:
    if not data:
        return None
    return Migration(str(data["id"]), str(data["source"]), str(data["target"]),
                     int(data["epoch"]), str(data.get("phase") or PREPARING),
                     float(data.get("started") or 0.0), data.get("port"),
                     tuple((str(s["step"]), float(s["time"])) for s in data.get("steps") or ()))


@dataclass(frozen=True)
class MigrationReport:
    """One line of a dom0's ``migrations``: its side of migration ``id``."""

    id: str
    side: str  # source | target
    state: str
    port: int | None = None
    error: str | None = None


def parse_reports(items: object) -> list[MigrationReport]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise InvalidReport("dom0.migrations must be a list")
    found = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise InvalidReport(f"dom0.migrations: malformed entry {item!r:.200}")
        side, state, port = item.get("side"), item.get("state"), item.get("port")
        states = TARGET_STATES if side == "target" else SOURCE_STATES if side == "source" \
            else ()
        if state not in states or (port is not None and (
                isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536)):
            raise InvalidReport(f"dom0.migrations: malformed entry {item!r:.200}")
        error = item.get("error")
        found.append(MigrationReport(item["id"], side, state, port,
                                     str(error)[:1000] if error else None))
    return found


@dataclass(frozen=True)
class Outcome:
    """What a report does to a migration: its new record (None: it ended), whether it
    completed (the claim moves) or was aborted, and a timeline stage."""

    migration: Migration | None
    completed: bool = False
    aborted: str | None = None  # why
    stage: str | None = None


def advance(migration: Migration, mac: str, report: MigrationReport, now: float) -> Outcome:
    """Migration ``migration`` after dom0 ``mac`` reported ``report`` of it."""
    unchanged = Outcome(migration)
    if report.id != migration.id:
        return unchanged
    if report.side == "target" and mac == migration.target:
        if report.state == "failed" and migration.phase != RELEASED:
            return Outcome(None, aborted=f"target: {report.error or 'failed'}",
                           stage="migrate.failed")
        if report.state == "listening" and migration.phase == PREPARING and report.port:
            return Outcome(_step(replace(migration, phase=SENDING, port=report.port),
                                 "target listening", now), stage="migrate.sending")
        if report.state == "running" and migration.phase == RELEASED:
            return Outcome(None, completed=True, stage="migrate.done")
        return unchanged
    if report.side == "source" and mac == migration.source:
        if report.state == "failed" and migration.phase in (PREPARING, SENDING):
            return Outcome(None, aborted=f"source: {report.error or 'failed'}",
                           stage="migrate.failed")
        if report.state == "released" and migration.phase == SENDING:
            return Outcome(_step(replace(migration, phase=RELEASED), "source released", now),
                           stage="migrate.released")
    return unchanged


def _step(migration: Migration, what: str, now: float) -> Migration:
    return replace(migration, steps=(*migration.steps, (what, now))[-12:])


__all__ = ["PHASES", "PREPARING", "RELEASED", "SENDING", "Migration", "MigrationReport",
           "Outcome", "advance", "from_json", "new_migration", "parse_reports"]
