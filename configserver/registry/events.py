"""Boot events in SQLite: batched appends, state transitions, reads, and pruning in steps.

Events are kept per node (the newest ``EVENTS_KEPT_PER_NODE`` of each MAC). Pruning is a pass
over the MACs that have events, one bounded step at a time: a step finds the next MAC (an index
seek), its cut-off (at most ``kept`` index entries) and deletes at most ``batch`` rows below
it, so no step's cost grows with the size of the table.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from configserver.model import BootEvent, NodeState
from configserver.registry.schema import owner, state_of

EVENTS_KEPT_PER_NODE = 1000
PRUNE_BATCH = 500  # rows one DELETE removes at most
PRUNE_AFTER = 5000  # events written between two pruning passes

_encode = json.JSONEncoder(default=str, separators=(",", ":")).encode

# One statement for a whole batch (one trip through SQLite, one release of the GIL): the
# batch is a JSON array of [mac, time, stage, detail]; any NIC's MAC names its node, and
# MACs the registry does not know are skipped.
_APPEND = (
    "INSERT INTO events (mac, time, stage, detail) "
    "SELECT k.node, e.value->>1, e.value->>2, e.value->3 FROM json_each(?1) AS e "
    "JOIN nics AS k ON k.mac = e.value->>0 ORDER BY e.key")
_TOUCH = (
    "UPDATE nodes SET last_seen = s.seen FROM ("
    " SELECT k.node AS mac, max(e.value->>1) AS seen FROM json_each(?1) AS e"
    " JOIN nics AS k ON k.mac = e.value->>0 GROUP BY k.node) AS s "
    "WHERE nodes.mac = s.mac AND (nodes.last_seen IS NULL OR nodes.last_seen < s.seen)")


def add(db: sqlite3.Connection, mac: str, stage: str, detail: dict[str, Any],
        when: float) -> None:
    """One event of ``mac`` (a node's primary MAC), inside the caller's transaction."""
    db.execute("INSERT INTO events (mac, time, stage, detail) VALUES (?,?,?,?)",
               (mac, when, stage, _encode(detail)))


def append_batch(db: sqlite3.Connection, batch: list[tuple[str, float, str, dict[str, Any]]]
                 ) -> int:
    """Queued events, in order, and their nodes' ``last_seen``; the number written."""
    data = _encode(batch)
    written = db.execute(_APPEND, (data,)).rowcount
    if written:
        db.execute(_TOUCH, (data,))
    return written


def transition(db: sqlite3.Connection, mac: str, state: NodeState, reason: str,
               when: float) -> None:
    """Move node ``mac`` to ``state`` (recorded as a ``state`` event); no-op if it is there."""
    old = state_of(db, mac)
    if old == state:
        return
    db.execute("UPDATE nodes SET state=?, updated=? WHERE mac=?", (str(state), when, mac))
    detail = {"from": str(old), "to": str(state)}
    if reason:
        detail["reason"] = reason
    add(db, mac, "state", detail, when)


# A DHCP exchange moves these to ``booting``; never a ready node (its agent session decides).
MAY_ENTER_BOOTING = frozenset({NodeState.REGISTERED, NodeState.LOST})


def enter_booting(db: sqlite3.Connection, mac: str, when: float) -> None:
    """A boot began (firmware DHCP): ``booting`` if registered or lost."""
    node = owner(db, mac)
    if node is None:
        return
    state = state_of(db, node)
    if state not in MAY_ENTER_BOOTING:
        return
    db.execute("UPDATE nodes SET state=?, last_seen=max(coalesce(last_seen, 0), ?) "
               "WHERE mac=?", (str(NodeState.BOOTING), when, node))
    add(db, node, "state", {"from": str(state), "to": "booting"}, when)


def read(db: sqlite3.Connection, mac: str, limit: int) -> list[BootEvent]:
    """The newest ``limit`` events of node ``mac``, oldest first."""
    rows = db.execute(
        "SELECT * FROM (SELECT * FROM events WHERE mac=? ORDER BY id DESC LIMIT ?) "
        "ORDER BY id", (mac, limit)).fetchall()
    return [BootEvent(r["mac"], r["time"], r["stage"], json.loads(r["detail"])) for r in rows]


class PrunePass:
    """One pass over every MAC with events, deleting all but the newest ``kept`` of each.

    ``step`` is one bounded piece, run in its own short transaction; the pass keeps its place
    (the MAC it is at) between steps, so events written meanwhile are never a problem: they
    are newer than any cut-off.
    """

    def __init__(self, *, kept: int = EVENTS_KEPT_PER_NODE, batch: int = PRUNE_BATCH,
                 macs_per_step: int = 4) -> None:
        self.kept = kept
        self.batch = batch
        self.macs_per_step = macs_per_step
        self.after = ""  # MACs up to this one are done
        self.cutting: tuple[str, int] | None = None  # (mac, newest id to delete)
        self.deleted = 0
        self.steps = 0

    def step(self, db: sqlite3.Connection) -> bool:
        self.steps += 1
        for _ in range(self.macs_per_step):
            if self.cutting is None and not self._next_mac(db):
                return False
            if self.cutting is not None:
                mac, cutoff = self.cutting
                deleted = db.execute(
                    "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE mac=? AND "
                    "id<=? ORDER BY id LIMIT ?)", (mac, cutoff, self.batch)).rowcount
                self.deleted += deleted
                if deleted < self.batch:
                    self.cutting = None
                return True  # at most one DELETE per step
        return True

    def _next_mac(self, db: sqlite3.Connection) -> bool:
        row = db.execute("SELECT mac FROM events WHERE mac > ? ORDER BY mac LIMIT 1",
                         (self.after,)).fetchone()
        if row is None:
            return False
        mac = self.after = row[0]
        cut = db.execute("SELECT id FROM events WHERE mac=? ORDER BY id DESC LIMIT 1 OFFSET ?",
                         (mac, self.kept)).fetchone()
        if cut is not None:
            self.cutting = (mac, cut[0])
        return True


__all__ = ["EVENTS_KEPT_PER_NODE", "PRUNE_AFTER", "PRUNE_BATCH", "PrunePass", "add",
           "append_batch", "enter_booting", "read", "transition"]
