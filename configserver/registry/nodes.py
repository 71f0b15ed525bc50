"""Operator writes in SQLite: nodes, roles and settings, each validated inside its transaction.

Every function runs as one writer job (see ``writer.py``): it either applies whole or raises,
and then the savepoint around it leaves the database as it was. The checks come first, the
schema's constraints back them up.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from typing import Any

from configserver.errors import (
    Conflict,
    DuplicateAddress,
    DuplicateHostname,
    DuplicateMac,
    InvalidRequest,
    NotFound,
    RoleInUse,
    UnknownRole,
)
from configserver.model import (
    ApplyResult,
    Node,
    NodeSpec,
    NodeState,
    Role,
    UnknownMacPolicy,
)
from configserver.registry.events import add as add_event
from configserver.registry.events import transition
from configserver.registry.schema import jsonable, load, load_page, owner, role, validated_role

log = logging.getLogger(__name__)

NODE_FIELDS = {"role", "hostname", "ip", "kernel_args", "tags", "nics"}
ROLE_FIELDS = {"image", "template", "kernel_args", "hypervisor_args", "description"}


def add_node(db: sqlite3.Connection, spec: NodeSpec, now: float) -> Node:
    """Register ``spec`` (normalized); adopts the pending node of the same MAC."""
    node_owner = owner(db, spec.mac)
    existing = load(db, node_owner) if node_owner else None
    if existing is not None:
        if existing.state != NodeState.PENDING or node_owner != spec.mac:
            raise DuplicateMac(f"MAC {spec.mac} is already registered"
                               + (f" (a NIC of {node_owner})" if node_owner != spec.mac
                                  else ""), hint="use 'node set' to change it")
        release_nics(db, spec.mac)  # a discovered machine is being adopted
    write(db, spec, existing, now)
    add_event(db, spec.mac, "registered", {"role": spec.role}, now)
    return _loaded(db, spec.mac)


def update_node(db: sqlite3.Connection, mac: str, changes: dict[str, Any], now: float) -> Node:
    unknown = set(changes) - NODE_FIELDS
    if unknown:
        raise InvalidRequest(f"cannot change {', '.join(sorted(unknown))} of a node")
    current = load(db, owner(db, mac) or mac)
    if current is None:
        raise NotFound(f"no node with MAC {mac}")
    spec = current.spec()
    new = NodeSpec(
        mac=spec.mac, role=changes.get("role", spec.role),
        hostname=changes.get("hostname", spec.hostname), ip=changes.get("ip", spec.ip),
        kernel_args=changes.get("kernel_args", spec.kernel_args),
        tags=tuple(changes.get("tags", spec.tags)),
        extra_nics=tuple(changes.get("nics", spec.extra_nics))).normalized()
    release_nics(db, current.mac)
    write(db, new, current, now)
    add_event(db, new.mac, "updated", {k: jsonable(v) for k, v in changes.items()}, now)
    return _loaded(db, current.mac)


def remove_node(db: sqlite3.Connection, mac: str, now: float) -> None:
    node = owner(db, mac)
    if node is None:
        raise NotFound(f"no node with MAC {mac}")
    delete(db, node, now)


def apply(db: sqlite3.Connection, specs: Sequence[NodeSpec], roles: Sequence[Role],
          prune: bool, now: float) -> ApplyResult:
    """Create or update validated ``roles`` then normalized ``specs`` (all or none)."""
    created, updated, unchanged, removed = [], [], [], []
    roles_changed = tuple(r.name for r in roles if put_role(db, r))
    current = {n.mac: n for n in load_page(db)}
    wanted = {s.mac for s in specs}
    # Release the NICs of every node that changes or goes first, so that moving an address
    # or a NIC from one node to another in one inventory is no false conflict.
    for spec in specs:
        node = current.get(spec.mac)
        if node is not None and node.state != NodeState.PENDING and node.spec() == spec:
            unchanged.append(spec.mac)
        elif node is not None:
            release_nics(db, spec.mac)
    if prune:
        for mac, node in current.items():
            if mac not in wanted and node.state != NodeState.PENDING:
                delete(db, mac, now)
                removed.append(mac)
    for spec in specs:
        if spec.mac in unchanged:
            continue
        node = current.get(spec.mac)
        write(db, spec, node, now)
        if node is None or node.state == NodeState.PENDING:
            add_event(db, spec.mac, "registered", {"role": spec.role, "via": "apply"}, now)
            created.append(spec.mac)
        else:
            add_event(db, spec.mac, "updated", {"via": "apply"}, now)
            updated.append(spec.mac)
    return ApplyResult(tuple(created), tuple(updated), tuple(unchanged), tuple(removed),
                       roles_changed)


def write(db: sqlite3.Connection, spec: NodeSpec, existing: Node | None, now: float) -> None:
    """Insert or update a node, enforcing every rule.

    An existing node's NIC rows must have been released first (``release_nics``), so that its
    own MACs and addresses do not count as conflicts.
    """
    if role(db, spec.role) is None:
        raise UnknownRole(f"unknown role {spec.role!r}",
                          hint="see 'configserver role list' or add it with 'role add'")
    seen: set[str] = set()
    for nic in spec.nics:
        if nic.mac in seen:
            raise DuplicateMac(f"MAC {nic.mac} is given twice for one node")
        seen.add(nic.mac)
        nic_owner = owner(db, nic.mac)
        if nic_owner not in (None, spec.mac):
            raise DuplicateMac(f"MAC {nic.mac} already belongs to node {nic_owner}")
        if nic.ip:
            row = db.execute("SELECT node FROM nics WHERE ip=?", (nic.ip,)).fetchone()
            if row or [n.ip for n in spec.nics].count(nic.ip) > 1:
                holder = row["node"] if row else spec.mac
                raise DuplicateAddress(f"address {nic.ip} is already reserved for {holder}")
    if spec.hostname:
        row = db.execute("SELECT mac FROM nodes WHERE hostname=? AND mac!=?",
                         (spec.hostname, spec.mac)).fetchone()
        if row:
            raise DuplicateHostname(f"hostname {spec.hostname} is already used by "
                                    f"{row['mac']}")
    tags = json.dumps(list(spec.tags))
    if existing is None:
        db.execute(
            "INSERT INTO nodes (mac, role, hostname, kernel_args, tags, state, created,"
            " updated) VALUES (?,?,?,?,?,?,?,?)",
            (spec.mac, spec.role, spec.hostname, spec.kernel_args, tags,
             str(NodeState.REGISTERED), now, now))
    else:
        state = NodeState.REGISTERED if existing.state == NodeState.PENDING else existing.state
        db.execute(
            "UPDATE nodes SET role=?, hostname=?, kernel_args=?, tags=?, state=?, updated=?"
            " WHERE mac=?",
            (spec.role, spec.hostname, spec.kernel_args, tags, str(state), now, spec.mac))
    db.executemany("INSERT INTO nics (mac, node, position, ip) VALUES (?,?,?,?)",
                   [(nic.mac, spec.mac, position, nic.ip)
                    for position, nic in enumerate(spec.nics)])


def release_nics(db: sqlite3.Connection, mac: str) -> None:
    db.execute("DELETE FROM nics WHERE node=?", (mac,))


def delete(db: sqlite3.Connection, mac: str, now: float) -> None:
    db.execute("DELETE FROM nics WHERE node=?", (mac,))
    db.execute("DELETE FROM inventories WHERE mac=?", (mac,))
    db.execute("DELETE FROM nodes WHERE mac=?", (mac,))
    add_event(db, mac, "removed", {}, now)


def discover(db: sqlite3.Connection, mac: str, facts: dict[str, Any], now: float,
             max_pending: int) -> None:
    """Record an unknown MAC as a pending node; a known one is only seen again."""
    node = owner(db, mac)
    if node is not None:
        db.execute("UPDATE nodes SET last_seen=? WHERE mac=?", (now, node))
        return
    if pending_count(db) >= max_pending:
        log.warning("%s: not recorded, %d machines are already pending", mac, max_pending)
        return
    db.execute(
        "INSERT INTO nodes (mac, role, hostname, state, created, updated, last_seen, facts) "
        "VALUES (?,?,?,?,?,?,?,?)",
        (mac, None, None, str(NodeState.PENDING), now, now, now,
         json.dumps({"first_seen": now, **facts})))
    db.execute("INSERT INTO nics (mac, node, position, ip) VALUES (?,?,0,NULL)", (mac, mac))
    add_event(db, mac, "discovered", facts, now)


def purge_pending(db: sqlite3.Connection, cutoff: float | None) -> list[str]:
    """Delete the pending nodes last seen before ``cutoff`` (all if None); their MACs."""
    rows = db.execute("SELECT mac FROM nodes WHERE state=? AND coalesce(last_seen, created) < ?"
                      " ORDER BY mac", (str(NodeState.PENDING),
                                        float("inf") if cutoff is None else cutoff)).fetchall()
    macs = [(row[0],) for row in rows]
    # Their timelines go too: a flood of spoofed MACs must not leave events behind.
    for table, column in (("nics", "node"), ("inventories", "mac"), ("events", "mac"),
                          ("nodes", "mac")):
        db.executemany(f"DELETE FROM {table} WHERE {column}=?", macs)
    return [mac for (mac,) in macs]


def pending_count(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT count(*) FROM nodes WHERE state=?",
                          (str(NodeState.PENDING),)).fetchone()[0])


def set_state(db: sqlite3.Connection, mac: str, state: NodeState, reason: str,
              now: float) -> None:
    node = owner(db, mac)
    if node is None:
        raise NotFound(f"no node with MAC {mac}")
    transition(db, node, NodeState(state), reason, now)


# -- roles and settings ---------------------------------------------------------------------

def add_role(db: sqlite3.Connection, new: Role) -> Role:
    if role(db, new.name) is not None:
        raise Conflict(f"role {new.name} already exists", hint="use 'role set' to change it")
    put_role(db, new)
    return role(db, new.name)  # type: ignore[return-value]


def put_role(db: sqlite3.Connection, new: Role) -> bool:
    """Insert or update a validated role; True if it changed."""
    current = role(db, new.name)
    fields = (new.image, str(new.template), new.kernel_args, new.hypervisor_args,
              new.description)
    if current is not None:
        if (current.image, str(current.template), current.kernel_args,
                current.hypervisor_args, current.description) == fields:
            return False
        db.execute("UPDATE roles SET image=?, template=?, kernel_args=?, hypervisor_args=?,"
                   " description=? WHERE name=?", (*fields, new.name))
        return True
    db.execute("INSERT INTO roles VALUES (?,?,?,?,?,?,0)", (new.name, *fields))
    return True


def update_role(db: sqlite3.Connection, name: str, changes: dict[str, Any]) -> Role:
    unknown = set(changes) - ROLE_FIELDS
    if unknown:
        raise InvalidRequest(f"cannot change {', '.join(sorted(unknown))} of a role")
    current = role(db, name)
    if current is None:
        raise NotFound(f"no role {name!r}")
    put_role(db, validated_role(Role(**{**current.to_json(), **changes})))
    return role(db, name)  # type: ignore[return-value]


def remove_role(db: sqlite3.Connection, name: str) -> None:
    current = role(db, name)
    if current is None:
        raise NotFound(f"no role {name!r}")
    if current.builtin:
        raise RoleInUse(f"role {name} is built in and cannot be removed")
    count = db.execute("SELECT count(*) FROM nodes WHERE role=?", (name,)).fetchone()[0]
    if count:
        raise RoleInUse(f"role {name} is used by {count} node(s)")
    db.execute("DELETE FROM roles WHERE name=?", (name,))


def set_unknown_mac_policy(db: sqlite3.Connection, policy: UnknownMacPolicy) -> None:
    db.execute("INSERT OR REPLACE INTO settings VALUES ('unknown_mac', ?)",
               (str(UnknownMacPolicy(policy)),))


def _loaded(db: sqlite3.Connection, mac: str) -> Node:
    node = load(db, mac)
    assert node is not None
    return node
