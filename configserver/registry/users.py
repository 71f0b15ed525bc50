"""Users and their client certificates, in SQLite. The CA signs; this only remembers what
was issued to whom and what was revoked. Each write runs inside a writer job's transaction."""

from __future__ import annotations

import sqlite3

from configserver.errors import Conflict, NotFound
from configserver.registry import User


def _user(db: sqlite3.Connection, row: sqlite3.Row) -> User:
    cert = db.execute("SELECT serial, not_after FROM certificates WHERE user=? "
                      "ORDER BY issued DESC LIMIT 1", (row["name"],)).fetchone()
    return User(name=row["name"], kind=row["kind"], tenant=row["tenant"],
                created=row["created"], revoked=row["revoked"],
                serial=int(cert["serial"], 16) if cert else None,
                not_after=cert["not_after"] if cert else None)


def get(db: sqlite3.Connection, name: str) -> User | None:
    row = db.execute("SELECT * FROM users WHERE name=?", (name,)).fetchone()
    return _user(db, row) if row else None


def list_all(db: sqlite3.Connection) -> list[User]:
    return [_user(db, row) for row in db.execute("SELECT * FROM users ORDER BY name")]


def add(db: sqlite3.Connection, name: str, *, kind: str, tenant: str | None, serial: int,
        not_after: float, now: float) -> User:
    """A new user, or a revoked one given a new certificate; an active one is a Conflict."""
    row = db.execute("SELECT revoked FROM users WHERE name=?", (name,)).fetchone()
    if row is not None and row["revoked"] is None:
        raise Conflict(f"user {name!r} exists",
                       hint=f"revoke it first ('configserver user revoke {name}')")
    # An update, not a replace: a replace would cascade to the revoked certificates.
    db.execute("INSERT INTO users (name, kind, tenant, created, revoked) VALUES (?,?,?,?,NULL) "
               "ON CONFLICT(name) DO UPDATE SET kind=excluded.kind, tenant=excluded.tenant, "
               "created=excluded.created, revoked=NULL", (name, kind, tenant, now))
    db.execute("INSERT INTO certificates (serial, user, issued, not_after) VALUES (?,?,?,?)",
               (f"{serial:x}", name, now, not_after))
    found = get(db, name)
    assert found is not None
    return found


def revoke(db: sqlite3.Connection, name: str, now: float) -> User:
    if db.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone() is None:
        raise NotFound(f"no user {name!r}", hint="see 'configserver user list'")
    db.execute("UPDATE users SET revoked=coalesce(revoked, ?) WHERE name=?", (now, name))
    db.execute("UPDATE certificates SET revoked=? WHERE user=? AND revoked IS NULL",
               (now, name))
    found = get(db, name)
    assert found is not None
    return found


def revoked(db: sqlite3.Connection) -> list[tuple[int, float]]:
    return [(int(r["serial"], 16), r["revoked"]) for r in db.execute(
        "SELECT serial, revoked FROM certificates WHERE revoked IS NOT NULL ORDER BY revoked")]
