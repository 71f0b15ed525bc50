"""The SQLite registry's schema, its migrations and its row <-> model conversions."""

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
        facts=json.loads(row["facts"]),
    )


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
