"""What the dashboard draws, read in three plain queries: no JSON column is decoded but the
two memory figures of each dom0's last report, so a picture of a thousand nodes and thousands
of instances stays a few milliseconds of SQLite (``configserver.http.dashfeed``)."""

from __future__ import annotations

import sqlite3
from typing import Any

_NODES = (
    "SELECT n.mac, n.role, n.hostname, n.state, n.last_seen, n.last_heartbeat,"
    " n.drained IS NOT NULL AS drained,"
    " (SELECT k.ip FROM nics k WHERE k.node = n.mac ORDER BY k.position LIMIT 1) AS ip,"
    " r.facts ->> '$.total_memory_mib' AS total_memory_mib,"
    " r.facts ->> '$.free_memory_mib' AS free_memory_mib"
    " FROM nodes n LEFT JOIN dom0_reports r ON r.mac = n.mac ORDER BY n.mac")
_INSTANCES = (
    "SELECT i.name, i.tenant, i.desired, i.actual, i.claim_node AS node, i.memory, i.vcpus,"
    " h.hostname, v.name AS disk,"
    " (SELECT k.ip FROM instance_nics k WHERE k.instance = i.id AND k.ip IS NOT NULL"
    "  ORDER BY k.position LIMIT 1) AS ip"
    " FROM instances i LEFT JOIN nodes h ON h.mac = i.claim_node"
    " LEFT JOIN volumes v ON v.id = i.volume ORDER BY i.name")


def overview(db: sqlite3.Connection) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(nodes, instances) as rows of plain values, each in its list's order (MAC, name)."""
    nodes = [dict(row) for row in db.execute(_NODES)]
    instances = [dict(row) for row in db.execute(_INSTANCES)]
    return nodes, instances


__all__ = ["overview"]
