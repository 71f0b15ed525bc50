"""A small cloud for tests: ready storage nodes with reported room, a dom0, and reports."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from configserver.model import NodeSpec
from configserver.registry.schema import MIGRATIONS, split_sql

GIB = 1 << 30
SN1, SN2, SN3 = "52:54:00:00:05:01", "52:54:00:00:05:02", "52:54:00:00:05:03"
DOM0, DOM0B = "52:54:00:00:d0:01", "52:54:00:00:d0:02"
STORAGE = {SN1: ("sn1", "198.18.0.51"), SN2: ("sn2", "198.18.0.52"),
           SN3: ("sn3", "198.18.0.53")}


def ready(registry, mac: str, role: str, hostname: str, ip: str | None = None) -> None:
    registry.add_node(NodeSpec(mac=mac, role=role, hostname=hostname, ip=ip))
    registry.start_agent_session(mac, f"boot-{hostname}", None)
    registry.record_heartbeat(mac, {"uptime": 1.0})


def storage_report(free: int | None, exports: list[dict[str, Any]] | None = None,
                   removed: list[str] | None = None, disks: list[dict[str, Any]] | None = None
                   ) -> dict[str, Any]:
    vg = None if free is None else {"name": "netboot", "size": 100 * GIB, "free": free}
    return {"storage": {"vg": vg, "disks": disks or [], "exports": exports or [],
                        "removed": removed or [], "orphans": []}}


def exported(*volume_ids: str, state: str = "exported") -> list[dict[str, Any]]:
    return [{"volume": v, "state": state, "error": None, "sessions": [], "progress": None}
            for v in volume_ids]


def dom0_report(*attachments: dict[str, Any], detached: tuple[str, ...] = ()
                ) -> dict[str, Any]:
    return {"dom0": {"initiator": "iqn.x", "attachments": list(attachments),
                     "detached": list(detached)}}


def attachment(volume_id: str, state: str = "attached", *, created: bool = False,
               legs: tuple[tuple[str, str], ...] = ((SN1, "active"), (SN2, "active")),
               sync: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"volume": volume_id, "state": state, "device": f"/dev/md/nb-{volume_id}",
            "created": created, "sync": sync, "error": None,
            "legs": [{"node": n, "state": s} for n, s in legs]}


def cloud(registry, frees: dict[str, int] | None = None, *, dom0s: int = 1) -> None:
    """Ready storage nodes sn1 and sn2 (or those ``frees`` names) with their room reported,
    and ready dom0s dom0-1 (and dom0-2)."""
    frees = frees if frees is not None else {SN1: 50 * GIB, SN2: 40 * GIB}
    for mac, free in frees.items():
        hostname, ip = STORAGE[mac]
        ready(registry, mac, "storage", hostname, ip)
        registry.record_cloud_report(mac, storage_report(free))
    for i, mac in enumerate((DOM0, DOM0B)[:dom0s]):
        ready(registry, mac, "dom0", f"dom0-{i + 1}")


def old_schema(path: Path, version: int, state: str = "registered") -> sqlite3.Connection:
    """A database at schema ``version`` holding storage node old1 (52:54:00:00:00:01, with
    198.18.0.9), open for more rows; commit and close it before a registry opens it."""
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:version]:
        for statement in split_sql(script):
            db.execute(statement)
    db.execute(f"PRAGMA user_version={version}")
    db.execute("INSERT INTO roles VALUES ('storage','storage','linux','','','',1)")
    db.execute("INSERT INTO nodes (mac, role, hostname, state, created, updated) VALUES "
               "('52:54:00:00:00:01','storage','old1',?,1,1)", (state,))
    db.execute("INSERT INTO nics VALUES ('52:54:00:00:00:01','52:54:00:00:00:01',0,"
               "'198.18.0.9')")
    return db
