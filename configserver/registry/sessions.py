"""What the node agents report, in SQLite: their sessions (one token per boot), heartbeats,
inventories, and the nodes that fell silent. Each function runs inside the caller's
transaction (a writer job) or reads on the connection it is given."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from configserver.errors import NotFound
from configserver.model import Node, NodeState
from configserver.registry import AgentSession
from configserver.registry.events import add, transition
from configserver.registry.schema import load, owner, state_of


def _owner(db: sqlite3.Connection, mac: str) -> str:
    node = owner(db, mac)
    if node is None:
        raise NotFound(f"no node with MAC {mac}")
    return node


def session(db: sqlite3.Connection, mac: str) -> AgentSession | None:
    node = owner(db, mac)
    if node is None:
        return None
    row = db.execute("SELECT boot_id, token_hash, token_issued FROM nodes WHERE mac=?",
                     (node,)).fetchone()
    if row is None or row["boot_id"] is None:
        return None
    return AgentSession(node, row["boot_id"], row["token_hash"], row["token_issued"] or 0)


def by_token(db: sqlite3.Connection, token_hash: str) -> AgentSession | None:
    """The session whose token hashes to ``token_hash`` (indexed), if exactly one does."""
    rows = db.execute("SELECT mac, boot_id, token_hash, token_issued FROM nodes "
                      "WHERE token_hash=? LIMIT 2", (token_hash,)).fetchall()
    if len(rows) != 1 or rows[0]["boot_id"] is None:
        return None
    row = rows[0]
    return AgentSession(row["mac"], row["boot_id"], row["token_hash"], row["token_issued"] or 0)


def start(db: sqlite3.Connection, mac: str, boot_id: str, token_hash: str | None,
          now: float) -> None:
    node = _owner(db, mac)
    db.execute("UPDATE nodes SET boot_id=?, token_hash=?, token_issued=? WHERE mac=?",
               (boot_id, token_hash, now, node))
    add(db, node, "agent.lookup", {"boot_id": boot_id, "token_issued": token_hash is not None},
        now)
    if state_of(db, node) not in (NodeState.BOOTING, NodeState.PENDING):
        transition(db, node, NodeState.BOOTING, "agent started", now)


def heartbeat(db: sqlite3.Connection, mac: str, status: dict[str, Any], now: float) -> Node:
    node = _owner(db, mac)
    previous = state_of(db, node)
    db.execute("UPDATE nodes SET last_heartbeat=?, last_seen=?, facts=json_set(facts, "
               "'$.status', json(?)) WHERE mac=?", (now, now, json.dumps(status), node))
    if previous is not NodeState.READY:
        add(db, node, "agent.heartbeat", {"first_since": str(previous)}, now)
        transition(db, node, NodeState.READY, "heartbeat", now)
    updated = load(db, node)
    assert updated is not None
    return updated


def set_inventory(db: sqlite3.Connection, mac: str, inventory: dict[str, Any],
                  now: float) -> None:
    db.execute("INSERT OR REPLACE INTO inventories VALUES (?,?,?)",
               (_owner(db, mac), json.dumps(inventory), now))


def inventory(db: sqlite3.Connection, mac: str) -> dict[str, Any] | None:
    row = db.execute("SELECT inventory FROM inventories WHERE mac=?",
                     (owner(db, mac) or mac,)).fetchone()
    return json.loads(row["inventory"]) if row else None


def mark_lost(db: sqlite3.Connection, silent_since: float, now: float) -> list[str]:
    rows = db.execute("SELECT mac FROM nodes WHERE state=? AND last_heartbeat < ?",
                      (str(NodeState.READY), silent_since)).fetchall()
    for row in rows:
        transition(db, row["mac"], NodeState.LOST, "missed heartbeats", now)
    return [r["mac"] for r in rows]
