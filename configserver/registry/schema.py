"""The SQLite registry's schema, its migrations, its row <-> model conversions and the
single-row queries every part of it uses (on whichever connection it is given)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from configserver.errors import InvalidRole
from configserver.model import (
    BootTemplate,
    Nic,
    Node,
    NodeState,
    Role,
    validate_kernel_args,
    validate_role_name,
)

# Each entry migrates the schema from version N to N+1; never edit a released entry.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE roles (
        name TEXT PRIMARY KEY,
        image TEXT NOT NULL,
        template TEXT NOT NULL,
        kernel_args TEXT NOT NULL DEFAULT '',
        hypervisor_args TEXT NOT NULL DEFAULT '',
        description TEXT NOT NULL DEFAULT '',
        builtin INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE nodes (
        mac TEXT PRIMARY KEY,
        role TEXT REFERENCES roles(name),
        hostname TEXT,
        kernel_args TEXT NOT NULL DEFAULT '',
        tags TEXT NOT NULL DEFAULT '[]',
        state TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        last_seen REAL,
        last_heartbeat REAL,
        facts TEXT NOT NULL DEFAULT '{}',
        boot_id TEXT,
        token_hash TEXT,
        token_issued REAL
    );
    CREATE UNIQUE INDEX nodes_hostname ON nodes(hostname) WHERE hostname IS NOT NULL;
    CREATE INDEX nodes_state ON nodes(state);
    CREATE TABLE nics (
        mac TEXT PRIMARY KEY,
        node TEXT NOT NULL REFERENCES nodes(mac) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        ip TEXT UNIQUE
    );
    CREATE INDEX nics_node ON nics(node);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        mac TEXT NOT NULL,
        time REAL NOT NULL,
        stage TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_mac ON events(mac, id);
    CREATE TABLE inventories (
        mac TEXT PRIMARY KEY REFERENCES nodes(mac) ON DELETE CASCADE,
        inventory TEXT NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # Agent requests are authenticated by their token alone, before their body is read.
    """
    CREATE INDEX nodes_token_hash ON nodes(token_hash) WHERE token_hash IS NOT NULL;
    """,
    # 3: users and the client certificates issued to them (serials as hex text: 159 bits).
    """
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        tenant TEXT,
        created REAL NOT NULL,
        revoked REAL
    );
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        issued REAL NOT NULL,
        not_after REAL NOT NULL,
        revoked REAL
    );
    CREATE INDEX certificates_user ON certificates(user);
    """,
    # 4: replicated volumes (desired state, and what agents report), their timelines, and
    # each storage node's latest report (for placement). The generation is a setting.
    """
    CREATE TABLE volumes (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        size INTEGER NOT NULL,
        image TEXT,
        tenant TEXT,
        state TEXT NOT NULL,
        error TEXT,
        initialized INTEGER NOT NULL DEFAULT 0,
        redundancy TEXT NOT NULL DEFAULT 'unknown',
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE INDEX volumes_tenant ON volumes(tenant);
    CREATE TABLE volume_legs (
        volume TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
        node TEXT NOT NULL,
        position INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        error TEXT,
        member TEXT,
        PRIMARY KEY (volume, node)
    );
    CREATE INDEX volume_legs_node ON volume_legs(node);
    CREATE TABLE volume_attachments (
        volume TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
        node TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'requested',
        device TEXT,
        sync TEXT,
        error TEXT,
        detaching INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (volume, node)
    );
    CREATE INDEX volume_attachments_node ON volume_attachments(node);
    CREATE TABLE volume_events (
        id INTEGER PRIMARY KEY,
        volume TEXT NOT NULL,
        time REAL NOT NULL,
        stage TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX volume_events_volume ON volume_events(volume, id);
    CREATE TABLE storage_reports (
        mac TEXT PRIMARY KEY REFERENCES nodes(mac) ON DELETE CASCADE,
        facts TEXT NOT NULL,
        updated REAL NOT NULL
    );
    """,
    # 5: planned maintenance. ``drained``: when a drain was asked for (NULL: not drained);
    # ``drain_done``: when no dom0 held a leg there any more (``node.drained`` recorded).
    """
    ALTER TABLE nodes ADD COLUMN drained REAL;
    ALTER TABLE nodes ADD COLUMN drain_done REAL;
    """,
    # 6: instances and the guest map. ``claim_node``/``claim_epoch``: the one dom0 that may run
    # the instance (NULL: none); ``epoch``: the last epoch handed out (never reused).
    """
    CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        memory INTEGER NOT NULL,
        vcpus INTEGER NOT NULL,
        volume TEXT REFERENCES volumes(id) ON DELETE SET NULL,
        image TEXT,
        tenant TEXT,
        desired TEXT NOT NULL,
        actual TEXT NOT NULL DEFAULT 'stopped',
        claim_node TEXT,
        claim_epoch INTEGER,
        epoch INTEGER NOT NULL DEFAULT 0,
        ssh_keys TEXT NOT NULL DEFAULT '[]',
        usage TEXT NOT NULL DEFAULT '{}',
        reboots INTEGER NOT NULL DEFAULT 0,
        delete_disk INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE INDEX instances_tenant ON instances(tenant);
    CREATE INDEX instances_claim ON instances(claim_node);
    CREATE TABLE instance_nics (
        mac TEXT PRIMARY KEY,
        instance TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        ip TEXT UNIQUE
    );
    CREATE INDEX instance_nics_instance ON instance_nics(instance);
    CREATE TABLE instance_events (
        id INTEGER PRIMARY KEY,
        instance TEXT NOT NULL,
        time REAL NOT NULL,
        stage TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX instance_events_instance ON instance_events(instance, id);
    CREATE TABLE dom0_reports (
        mac TEXT PRIMARY KEY REFERENCES nodes(mac) ON DELETE CASCADE,
        facts TEXT NOT NULL,
        updated REAL NOT NULL
    );
    """,
    # 7: ``desired_generation``: the cloud generation that the last change of an instance's
    # desired state made. Its holder's report of the domain gone releases the claim only when
    # the report follows work at least that new (the holder had seen the stop).
    # ``resources``: its resource controls (``configserver.cloud.resources``), JSON.
    # ``instance_usage``: an instance's usage totals over time (one sample per few minutes at
    # most), for usage since a given time; kept by instance id after the instance is gone.
    """
    ALTER TABLE instances ADD COLUMN desired_generation INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE instances ADD COLUMN resources TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE instance_usage (
        instance TEXT NOT NULL,
        time REAL NOT NULL,
        totals TEXT NOT NULL
    );
    CREATE INDEX instance_usage_instance ON instance_usage(instance, time);
    """,
    # 8: ``migration``: a live migration in progress (``configserver.cloud.migration``),
    # JSON; NULL when none.
    """
    ALTER TABLE instances ADD COLUMN migration TEXT;
    """,
    # 9: ``drain_limit``: how many live migrations at once a drained dom0 sends its
    # instances away with (``configserver.cloud.drain``); NULL: the default.
    """
    ALTER TABLE nodes ADD COLUMN drain_limit INTEGER;
    """,
    # 10: ``failover``: the instance's dom0 is lost; its fencing at the storage nodes and
    # the restart elsewhere that follows (``configserver.cloud.failover``), JSON; NULL: none.
    """
    ALTER TABLE instances ADD COLUMN failover TEXT;
    """,
)


def split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [jsonable(v) for v in value]
    if isinstance(value, Nic):
        return {"mac": value.mac, "ip": value.ip}
    return value


def node_from_row(row: sqlite3.Row, nics: Sequence[sqlite3.Row]) -> Node:
    return Node(
        mac=row["mac"], role=row["role"], hostname=row["hostname"],
        nics=tuple(Nic(n["mac"], n["ip"]) for n in nics) or (Nic(row["mac"]),),
        kernel_args=row["kernel_args"], tags=tuple(json.loads(row["tags"])),
        state=NodeState(row["state"]), created=row["created"], updated=row["updated"],
        last_seen=row["last_seen"], last_heartbeat=row["last_heartbeat"],
        facts=json.loads(row["facts"]), drained=row["drained"],
    )


def owner(db: sqlite3.Connection, mac: str) -> str | None:
    """The primary MAC of the node that has NIC ``mac`` (or is ``mac``), if any."""
    row = db.execute("SELECT node FROM nics WHERE mac=?", (mac,)).fetchone()
    if row:
        return str(row[0])
    row = db.execute("SELECT mac FROM nodes WHERE mac=?", (mac,)).fetchone()
    return str(row[0]) if row else None


def state_of(db: sqlite3.Connection, mac: str) -> NodeState | None:
    row = db.execute("SELECT state FROM nodes WHERE mac=?", (mac,)).fetchone()
    return NodeState(row[0]) if row else None


def load(db: sqlite3.Connection, mac: str) -> Node | None:
    """Node ``mac`` (a primary MAC) with its NICs."""
    row = db.execute("SELECT * FROM nodes WHERE mac=?", (mac,)).fetchone()
    if row is None:
        return None
    nics = db.execute("SELECT mac, ip FROM nics WHERE node=? ORDER BY position",
                      (mac,)).fetchall()
    return node_from_row(row, nics)


def load_page(db: sqlite3.Connection, *, after: str = "", state: str | None = None,
              also: Sequence[str] = (), limit: int = -1) -> list[Node]:
    """Nodes after MAC ``after`` in MAC order (``limit`` of them; -1: all), with their NICs.

    With ``state``, only nodes in that state, and the nodes ``also`` names whatever theirs.
    """
    if state is None:
        rows = db.execute("SELECT * FROM nodes WHERE mac > ? ORDER BY mac LIMIT ?",
                          (after, limit)).fetchall()
    else:
        rows = db.execute(
            "SELECT * FROM nodes WHERE mac > ? AND (state=? OR mac IN (SELECT value FROM "
            "json_each(?))) ORDER BY mac LIMIT ?",
            (after, state, json.dumps(list(also)), limit)).fetchall()
    if not rows:
        return []
    nics: dict[str, list[sqlite3.Row]] = {}
    if limit < 0 and state is None:
        query = db.execute("SELECT node, mac, ip FROM nics ORDER BY node, position")
    else:
        query = db.execute("SELECT node, mac, ip FROM nics WHERE node IN (SELECT value FROM "
                           "json_each(?)) ORDER BY node, position",
                           (json.dumps([r["mac"] for r in rows]),))
    for nic in query:
        nics.setdefault(nic["node"], []).append(nic)
    return [node_from_row(row, nics.get(row["mac"], [])) for row in rows]


def role(db: sqlite3.Connection, name: str) -> Role | None:
    row = db.execute("SELECT * FROM roles WHERE name=?", (name,)).fetchone()
    return role_from_row(row) if row else None


def role_from_row(row: sqlite3.Row) -> Role:
    return Role(name=row["name"], image=row["image"], template=BootTemplate(row["template"]),
                kernel_args=row["kernel_args"], hypervisor_args=row["hypervisor_args"],
                description=row["description"], builtin=bool(row["builtin"]))


def validated_role(role: Role) -> Role:
    try:
        template = BootTemplate(role.template)
    except ValueError:
        raise InvalidRole(f"unknown boot template {role.template!r}",
                          hint="one of: " + ", ".join(t.value for t in BootTemplate)) from None
    validate_role_name(role.name)
    validate_role_name(role.image)
    return Role(name=role.name, image=role.image, template=template,
                kernel_args=validate_kernel_args(role.kernel_args),
                hypervisor_args=validate_kernel_args(role.hypervisor_args),
                description=str(role.description)[:200], builtin=role.builtin)
