"""The embedded registry backend: one SQLite database in WAL mode in the state directory.

Every write is one transaction that either applies whole or leaves the database as it was;
validation happens before and inside it (constraints back up the checks). Reads are single
indexed queries so that DHCP, TFTP and HTTP boot can ask on every packet.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from configserver.errors import (
    Conflict,
    DuplicateAddress,
    DuplicateHostname,
    DuplicateMac,
    InvalidRequest,
    NotFound,
    RoleInUse,
    StoreError,
    TooManyPending,
    UnknownRole,
)
from configserver.model import (
    BUILTIN_ROLES,
    ApplyResult,
    BootEvent,
    Node,
    NodeSpec,
    NodeState,
    Role,
    UnknownMacPolicy,
    normalize_mac,
)
from configserver.registry import AgentSession
from configserver.registry.schema import (
    MIGRATIONS,
    jsonable,
    node_from_row,
    role_from_row,
    split_sql,
    validated_role,
)

log = logging.getLogger(__name__)

EVENTS_KEPT_PER_NODE = 1000
# Discovered machines kept at most: spoofed PXE requests must not grow the registry unbounded.
MAX_PENDING = 4096


_NODE_FIELDS = {"role", "hostname", "ip", "kernel_args", "tags", "nics"}
_ROLE_FIELDS = {"image", "template", "kernel_args", "hypervisor_args", "description"}


class SqliteRegistry:
    """Registry backed by ``registry.sqlite`` in the state directory."""

    def __init__(self, path: Path, *, synchronous: str = "NORMAL",
                 clock=time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), isolation_level=None,
                                       check_same_thread=False, timeout=10.0)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open registry {self.path}: {exc}") from exc
        self._events_since_prune = 0

    # -- plumbing ---------------------------------------------------------------------------

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(f"registry {self.path} has schema {version}, newer than this "
                             f"program knows ({len(MIGRATIONS)})", hint="upgrade configserver")
        for number in range(version, len(MIGRATIONS)):
            with self._tx():
                for statement in split_sql(MIGRATIONS[number]):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={number + 1}")
            log.info("registry schema migrated to version %d", number + 1)
        with self._tx():
            for role in BUILTIN_ROLES:
                self._db.execute(
                    "INSERT OR IGNORE INTO roles VALUES (?,?,?,?,?,?,1)",
                    (role.name, role.image, str(role.template), role.kernel_args,
                     role.hypervisor_args, role.description))

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"registry {self.path} is not writable: {exc}") from exc
        try:
            yield self._db
        except sqlite3.Error as exc:
            self._db.execute("ROLLBACK")
            raise StoreError(f"registry write failed: {exc}") from exc
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise StoreError(f"registry commit failed: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def _now(self) -> float:
        return float(self._clock())

    # -- hot path ---------------------------------------------------------------------------

    def lookup(self, mac: str) -> Node | None:
        # Every node's primary MAC has a NIC row too, so one indexed query answers.
        row = self._db.execute("SELECT node FROM nics WHERE mac=?", (mac,)).fetchone()
        return self._load(row["node"]) if row else None

    def lookup_ip(self, ip: str) -> Node | None:
        row = self._db.execute("SELECT node FROM nics WHERE ip=?", (ip,)).fetchone()
        return self._load(row["node"]) if row else None

    def role(self, name: str) -> Role | None:
        row = self._db.execute("SELECT * FROM roles WHERE name=?", (name,)).fetchone()
        return role_from_row(row) if row else None

    def unknown_mac_policy(self) -> UnknownMacPolicy:
        row = self._db.execute("SELECT value FROM settings WHERE key='unknown_mac'").fetchone()
        return UnknownMacPolicy(row["value"]) if row else UnknownMacPolicy.IGNORE

    def _load(self, mac: str) -> Node | None:
        row = self._db.execute("SELECT * FROM nodes WHERE mac=?", (mac,)).fetchone()
        if row is None:
            return None
        nics = self._db.execute("SELECT mac, ip FROM nics WHERE node=? ORDER BY position",
                                (mac,)).fetchall()
        return node_from_row(row, nics)

    # -- nodes ------------------------------------------------------------------------------

    def list_nodes(self, *, state: NodeState | None = None) -> list[Node]:
        if state is None:
            rows = self._db.execute("SELECT * FROM nodes ORDER BY mac").fetchall()
        else:
            rows = self._db.execute("SELECT * FROM nodes WHERE state=? ORDER BY mac",
                                    (str(state),)).fetchall()
        nics: dict[str, list[sqlite3.Row]] = {}
        for nic in self._db.execute("SELECT node, mac, ip FROM nics ORDER BY node, position"):
            nics.setdefault(nic["node"], []).append(nic)
        return [node_from_row(row, nics.get(row["mac"], [])) for row in rows]

    def add_node(self, spec: NodeSpec) -> Node:
        spec = spec.normalized()
        with self._tx():
            owner = self._owner(spec.mac)
            existing = self._load(owner) if owner else None
            if existing is not None:
                if existing.state != NodeState.PENDING or owner != spec.mac:
                    raise DuplicateMac(f"MAC {spec.mac} is already registered"
                                       + (f" (a NIC of {owner})" if owner != spec.mac
                                          else ""), hint="use 'node set' to change it")
                self._release_nics(owner)  # a discovered machine is being adopted
            self._write(spec, existing)
            self._event(spec.mac, "registered", {"role": spec.role})
        node = self._load(spec.mac)
        assert node is not None
        return node

    def update_node(self, mac: str, changes: dict[str, Any]) -> Node:
        mac = normalize_mac(mac)
        unknown = set(changes) - _NODE_FIELDS
        if unknown:
            raise InvalidRequest(f"cannot change {', '.join(sorted(unknown))} of a node")
        with self._tx():
            current = self._load(self._owner(mac) or mac)
            if current is None:
                raise NotFound(f"no node with MAC {mac}")
            spec = current.spec()
            fields = {
                "mac": spec.mac, "role": changes.get("role", spec.role),
                "hostname": changes.get("hostname", spec.hostname),
                "ip": changes.get("ip", spec.ip),
                "kernel_args": changes.get("kernel_args", spec.kernel_args),
                "tags": tuple(changes.get("tags", spec.tags)),
                "extra_nics": tuple(changes.get("nics", spec.extra_nics)),
            }
            new = NodeSpec(**fields).normalized()
            self._release_nics(current.mac)
            self._write(new, current)
            self._event(new.mac, "updated", {k: jsonable(v) for k, v in changes.items()})
        node = self._load(current.mac)
        assert node is not None
        return node

    def remove_node(self, mac: str) -> None:
        mac = normalize_mac(mac)
        with self._tx():
            owner = self._owner(mac)
            if owner is None:
                raise NotFound(f"no node with MAC {mac}")
            self._delete(owner)

    def apply(self, specs: Sequence[NodeSpec], *, prune: bool = False,
              roles: Sequence[Role] = ()) -> ApplyResult:
        """Create or update ``roles`` then nodes ``specs`` in one transaction (all or none)."""
        wanted_roles = [validated_role(r) for r in roles]
        normalized = [s.normalized() for s in specs]
        seen: set[str] = set()
        for spec in normalized:
            for nic in spec.nics:
                if nic.mac in seen:
                    raise DuplicateMac(f"MAC {nic.mac} appears twice in the inventory")
                seen.add(nic.mac)
        created, updated, unchanged, removed = [], [], [], []
        with self._tx():
            roles_changed = tuple(r.name for r in wanted_roles if self._put_role(r))
            current = {n.mac: n for n in self.list_nodes()}
            wanted = {s.mac for s in normalized}
            # Release the NICs of every node that changes or goes first, so that moving an
            # address or a NIC from one node to another in one inventory is no false conflict.
            for spec in normalized:
                node = current.get(spec.mac)
                if node is not None and node.state != NodeState.PENDING and node.spec() == spec:
                    unchanged.append(spec.mac)
                elif node is not None:
                    self._release_nics(spec.mac)
            if prune:
                for mac, node in current.items():
                    if mac not in wanted and node.state != NodeState.PENDING:
                        self._delete(mac)
                        removed.append(mac)
            for spec in normalized:
                if spec.mac in unchanged:
                    continue
                node = current.get(spec.mac)
                self._write(spec, node)
                if node is None or node.state == NodeState.PENDING:
                    self._event(spec.mac, "registered", {"role": spec.role, "via": "apply"})
                    created.append(spec.mac)
                else:
                    self._event(spec.mac, "updated", {"via": "apply"})
                    updated.append(spec.mac)
        return ApplyResult(tuple(created), tuple(updated), tuple(unchanged), tuple(removed),
                           roles_changed)

    def _owner(self, mac: str) -> str | None:
        row = self._db.execute("SELECT node FROM nics WHERE mac=?", (mac,)).fetchone()
        if row:
            return str(row["node"])
        row = self._db.execute("SELECT mac FROM nodes WHERE mac=?", (mac,)).fetchone()
        return str(row["mac"]) if row else None

    def _state(self, mac: str) -> NodeState | None:
        row = self._db.execute("SELECT state FROM nodes WHERE mac=?", (mac,)).fetchone()
        return NodeState(row["state"]) if row else None

    def _write(self, spec: NodeSpec, existing: Node | None) -> None:
        """Insert or update a node inside the caller's transaction, enforcing every rule.

        An existing node's NIC rows must have been released first (``_release_nics``), so that
        its own MACs and addresses do not count as conflicts.
        """
        if self.role(spec.role) is None:
            raise UnknownRole(f"unknown role {spec.role!r}",
                              hint="see 'configserver role list' or add it with 'role add'")
        seen: set[str] = set()
        for nic in spec.nics:
            if nic.mac in seen:
                raise DuplicateMac(f"MAC {nic.mac} is given twice for one node")
            seen.add(nic.mac)
            owner = self._owner(nic.mac)
            if owner not in (None, spec.mac):
                raise DuplicateMac(f"MAC {nic.mac} already belongs to node {owner}")
            if nic.ip:
                row = self._db.execute("SELECT node FROM nics WHERE ip=?", (nic.ip,)).fetchone()
                if row or [n.ip for n in spec.nics].count(nic.ip) > 1:
                    holder = row["node"] if row else spec.mac
                    raise DuplicateAddress(f"address {nic.ip} is already reserved for {holder}")
        if spec.hostname:
            row = self._db.execute("SELECT mac FROM nodes WHERE hostname=? AND mac!=?",
                                   (spec.hostname, spec.mac)).fetchone()
            if row:
                raise DuplicateHostname(f"hostname {spec.hostname} is already used by "
                                        f"{row['mac']}")
        now = self._now()
        tags = json.dumps(list(spec.tags))
        if existing is None:
            self._db.execute(
                "INSERT INTO nodes (mac, role, hostname, kernel_args, tags, state, created,"
                " updated) VALUES (?,?,?,?,?,?,?,?)",
                (spec.mac, spec.role, spec.hostname, spec.kernel_args, tags,
                 str(NodeState.REGISTERED), now, now))
        else:
            state = (NodeState.REGISTERED if existing.state == NodeState.PENDING
                     else existing.state)
            self._db.execute(
                "UPDATE nodes SET role=?, hostname=?, kernel_args=?, tags=?, state=?, updated=?"
                " WHERE mac=?",
                (spec.role, spec.hostname, spec.kernel_args, tags, str(state), now, spec.mac))
        for position, nic in enumerate(spec.nics):
            self._db.execute("INSERT INTO nics (mac, node, position, ip) VALUES (?,?,?,?)",
                             (nic.mac, spec.mac, position, nic.ip))

    def _release_nics(self, mac: str) -> None:
        self._db.execute("DELETE FROM nics WHERE node=?", (mac,))

    def _delete(self, mac: str) -> None:
        self._db.execute("DELETE FROM nics WHERE node=?", (mac,))
        self._db.execute("DELETE FROM inventories WHERE mac=?", (mac,))
        self._db.execute("DELETE FROM nodes WHERE mac=?", (mac,))
        self._event(mac, "removed", {})

    # -- roles ------------------------------------------------------------------------------

    def list_roles(self) -> list[Role]:
        return [role_from_row(r) for r in self._db.execute("SELECT * FROM roles ORDER BY name")]

    def add_role(self, role: Role) -> Role:
        role = validated_role(role)
        with self._tx():
            if self.role(role.name) is not None:
                raise Conflict(f"role {role.name} already exists",
                               hint="use 'role set' to change it")
            self._put_role(role)
        return self.role(role.name)  # type: ignore[return-value]

    def _put_role(self, role: Role) -> bool:
        """Insert or update a validated role inside the caller's transaction; True if changed."""
        current = self.role(role.name)
        if current is not None:
            if (current.image, current.template, current.kernel_args, current.hypervisor_args,
                    current.description) == (role.image, role.template, role.kernel_args,
                                             role.hypervisor_args, role.description):
                return False
            self._db.execute(
                "UPDATE roles SET image=?, template=?, kernel_args=?, hypervisor_args=?,"
                " description=? WHERE name=?",
                (role.image, str(role.template), role.kernel_args, role.hypervisor_args,
                 role.description, role.name))
            return True
        self._db.execute("INSERT INTO roles VALUES (?,?,?,?,?,?,0)",
                         (role.name, role.image, str(role.template), role.kernel_args,
                          role.hypervisor_args, role.description))
        return True

    def update_role(self, name: str, changes: dict[str, Any]) -> Role:
        unknown = set(changes) - _ROLE_FIELDS
        if unknown:
            raise InvalidRequest(f"cannot change {', '.join(sorted(unknown))} of a role")
        with self._tx():
            current = self.role(name)
            if current is None:
                raise NotFound(f"no role {name!r}")
            fields = {**current.to_json(), **changes}
            self._put_role(validated_role(Role(**fields)))
        return self.role(name)  # type: ignore[return-value]

    def remove_role(self, name: str) -> None:
        with self._tx():
            role = self.role(name)
            if role is None:
                raise NotFound(f"no role {name!r}")
            if role.builtin:
                raise RoleInUse(f"role {name} is built in and cannot be removed")
            count = self._db.execute("SELECT count(*) FROM nodes WHERE role=?",
                                     (name,)).fetchone()[0]
            if count:
                raise RoleInUse(f"role {name} is used by {count} node(s)")
            self._db.execute("DELETE FROM roles WHERE name=?", (name,))

    def set_unknown_mac_policy(self, policy: UnknownMacPolicy) -> None:
        with self._tx():
            self._db.execute("INSERT OR REPLACE INTO settings VALUES ('unknown_mac', ?)",
                             (str(UnknownMacPolicy(policy)),))

    # -- what the servers record ------------------------------------------------------------

    def discover(self, mac: str, facts: dict[str, Any]) -> Node:
        """Record an unknown MAC as a pending node (idempotent; keeps the first-seen time)."""
        now = self._now()
        with self._tx():
            owner = self._owner(mac)
            if owner is None:
                pending = self._db.execute("SELECT count(*) FROM nodes WHERE state=?",
                                           (str(NodeState.PENDING),)).fetchone()[0]
                if pending >= MAX_PENDING:
                    raise TooManyPending(
                        f"{pending} machines are already waiting to be registered; "
                        f"{mac} is not recorded",
                        hint="register or remove pending nodes (node list --pending)")
                self._db.execute(
                    "INSERT INTO nodes (mac, role, hostname, state, created, updated, last_seen,"
                    " facts) VALUES (?,?,?,?,?,?,?,?)",
                    (mac, None, None, str(NodeState.PENDING), now, now, now,
                     json.dumps({"first_seen": now, **facts})))
                self._db.execute("INSERT INTO nics (mac, node, position, ip) VALUES (?,?,0,NULL)",
                                 (mac, mac))
                self._event(mac, "discovered", facts)
            else:
                self._db.execute("UPDATE nodes SET last_seen=? WHERE mac=?", (now, owner))
        node = self._load(owner or mac)
        assert node is not None
        return node

    def record_event(self, mac: str, stage: str, detail: dict[str, Any] | None = None,
                     *, booting: bool = False) -> None:
        now = self._now()
        with self._tx():
            owner = self._owner(mac)
            if owner is None:
                return  # only known (or discovered) machines have a timeline
            self._event(owner, stage, detail or {}, now)
            state = self._state(owner)
            if booting and state not in (NodeState.PENDING, NodeState.BOOTING):
                self._db.execute("UPDATE nodes SET state=?, last_seen=? WHERE mac=?",
                                 (str(NodeState.BOOTING), now, owner))
                self._event(owner, "state", {"from": str(state), "to": "booting"}, now)
            else:
                self._db.execute("UPDATE nodes SET last_seen=? WHERE mac=?", (now, owner))

    def _event(self, mac: str, stage: str, detail: dict[str, Any],
               when: float | None = None) -> None:
        self._db.execute("INSERT INTO events (mac, time, stage, detail) VALUES (?,?,?,?)",
                         (mac, when if when is not None else self._now(), stage,
                          json.dumps(detail, default=str)))
        self._events_since_prune += 1
        if self._events_since_prune >= 5000:
            self._events_since_prune = 0
            self._db.execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM (SELECT id, row_number() OVER "
                "(PARTITION BY mac ORDER BY id DESC) AS n FROM events) WHERE n > ?)",
                (EVENTS_KEPT_PER_NODE,))

    def events(self, mac: str, limit: int = 500) -> list[BootEvent]:
        owner = self._owner(mac) or mac
        rows = self._db.execute(
            "SELECT * FROM (SELECT * FROM events WHERE mac=? ORDER BY id DESC LIMIT ?) "
            "ORDER BY id", (owner, limit)).fetchall()
        return [BootEvent(r["mac"], r["time"], r["stage"], json.loads(r["detail"]))
                for r in rows]

    def set_state(self, mac: str, state: NodeState, reason: str = "") -> None:
        with self._tx():
            owner = self._owner(mac)
            if owner is None:
                raise NotFound(f"no node with MAC {mac}")
            self._transition(owner, NodeState(state), reason)

    def _transition(self, mac: str, state: NodeState, reason: str) -> None:
        old = self._state(mac)
        if old == state:
            return
        self._db.execute("UPDATE nodes SET state=?, updated=? WHERE mac=?",
                         (str(state), self._now(), mac))
        detail = {"from": str(old), "to": str(state)}
        if reason:
            detail["reason"] = reason
        self._event(mac, "state", detail)

    # -- agent sessions ---------------------------------------------------------------------

    def agent_session(self, mac: str) -> AgentSession | None:
        owner = self._owner(mac)
        if owner is None:
            return None
        row = self._db.execute("SELECT boot_id, token_hash, token_issued FROM nodes WHERE mac=?",
                               (owner,)).fetchone()
        if row is None or row["boot_id"] is None:
            return None
        return AgentSession(owner, row["boot_id"], row["token_hash"], row["token_issued"] or 0)

    def start_agent_session(self, mac: str, boot_id: str, token_hash: str | None) -> None:
        with self._tx():
            owner = self._owner(mac)
            if owner is None:
                raise NotFound(f"no node with MAC {mac}")
            self._db.execute("UPDATE nodes SET boot_id=?, token_hash=?, token_issued=? "
                             "WHERE mac=?", (boot_id, token_hash, self._now(), owner))
            self._event(owner, "agent.lookup", {"boot_id": boot_id,
                                                "token_issued": token_hash is not None})
            if self._state(owner) not in (NodeState.BOOTING, NodeState.PENDING):
                self._transition(owner, NodeState.BOOTING, "agent started")

    def record_heartbeat(self, mac: str, status: dict[str, Any]) -> Node:
        now = self._now()
        with self._tx():
            owner = self._owner(mac)
            if owner is None:
                raise NotFound(f"no node with MAC {mac}")
            previous = self._state(owner)
            first = previous is not NodeState.READY
            self._db.execute(
                "UPDATE nodes SET last_heartbeat=?, last_seen=?, facts=json_set(facts, "
                "'$.status', json(?)) WHERE mac=?", (now, now, json.dumps(status), owner))
            if first:
                self._event(owner, "agent.heartbeat", {"first_since": str(previous)})
                self._transition(owner, NodeState.READY, "heartbeat")
        node = self._load(owner)
        assert node is not None
        return node

    def set_inventory(self, mac: str, inventory: dict[str, Any]) -> None:
        with self._tx():
            owner = self._owner(mac)
            if owner is None:
                raise NotFound(f"no node with MAC {mac}")
            self._db.execute("INSERT OR REPLACE INTO inventories VALUES (?,?,?)",
                             (owner, json.dumps(inventory), self._now()))

    def inventory(self, mac: str) -> dict[str, Any] | None:
        owner = self._owner(mac) or mac
        row = self._db.execute("SELECT inventory FROM inventories WHERE mac=?",
                               (owner,)).fetchone()
        return json.loads(row["inventory"]) if row else None

    def mark_lost(self, silent_since: float) -> list[str]:
        with self._tx():
            rows = self._db.execute(
                "SELECT mac FROM nodes WHERE state=? AND last_heartbeat < ?",
                (str(NodeState.READY), silent_since)).fetchall()
            for row in rows:
                self._transition(row["mac"], NodeState.LOST, "missed heartbeats")
        return [r["mac"] for r in rows]


__all__ = ["MIGRATIONS", "SqliteRegistry"]
