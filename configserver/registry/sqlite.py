"""The embedded registry backend: one SQLite database in WAL mode in the state directory.

Reads run on the caller's thread, on that thread's own connection, as indexed queries; the
hot-path ones (a node by MAC or address, a role, the unknown-MAC policy) are remembered for two
seconds (``cache.py``) and forgotten at every write, so that DHCP, TFTP and HTTP boot can ask
on every packet. Writes never run there: they go through the registry's one writer
(``writer.py``), which commits them in batches on its own connection, off the event loop.

* Boot events (``record_event``) are fire-and-forget: queued, and dropped (counted, logged at
  most once per 10 s) when the queue is full. ``events`` commits the queue before it reads.
* Operator writes (nodes, roles, settings), agent sessions, heartbeats, inventories, state
  changes: the call returns once its transaction committed, or raises what refused it, so any
  read after it sees it. Each blocks its thread for one commit: the HTTP handlers make these
  calls through ``asyncio.to_thread``.
* The two state changes the protocol servers make, entering ``booting`` (``record_event(...,
  booting=True)``) and ``discover``, are queued without waiting, like events, but never
  dropped. Until they commit, reads see them anyway: the registry keeps what they will change
  (``Unsettled``) and lays it over what it reads, and forgets it once the commit is done. So a
  read right after a write from this process always sees it.

Every write is one job that either applies whole or leaves the database as it was; validation
happens before and inside it (constraints back up the checks).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from configserver import statedir
from configserver.errors import DuplicateMac, StoreError, TooManyPending
from configserver.model import (
    BUILTIN_ROLES,
    ApplyResult,
    BootEvent,
    Nic,
    Node,
    NodeSpec,
    NodeState,
    Role,
    UnknownMacPolicy,
    normalize_mac,
)
from configserver.registry import AgentSession, User, nodes, sessions, users
from configserver.registry import events as boot_events
from configserver.registry.cache import ReadCache
from configserver.registry.cloudstore import CloudStore
from configserver.registry.events import EVENTS_KEPT_PER_NODE, PRUNE_AFTER, PrunePass
from configserver.registry.schema import (
    MIGRATIONS,
    load,
    load_page,
    owner,
    role_from_row,
    split_sql,
    validated_role,
)
from configserver.registry.writer import COMMIT_DELAY, QUEUE_LIMIT, RegistryWriter

log = logging.getLogger(__name__)

T = TypeVar("T")

# Discovered machines kept at most: spoofed PXE requests must not grow the registry unbounded.
MAX_PENDING = 4096


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class Unsettled:
    """Queued state changes that reads must see before they commit: node states and
    discovered machines, each under the sequence number of the writer job that makes it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.states: dict[str, tuple[int, NodeState]] = {}
        self.discovered: dict[str, tuple[int, Node]] = {}

    def settled(self, seq: int) -> None:
        """Jobs up to ``seq`` are committed (or failed): what they promised is on disk."""
        with self.lock:
            for table in (self.states, self.discovered):
                for key in [k for k, (s, _) in table.items() if s <= seq]:
                    del table[key]

    def over(self, node: Node | None) -> Node | None:
        """``node`` as read from the database, with its queued state change."""
        if node is None or not self.states:
            return node
        change = self.states.get(node.mac)
        return node if change is None else replace(node, state=change[1])


class SqliteRegistry(CloudStore):
    """Registry backed by ``registry.sqlite`` in the state directory."""

    def __init__(self, path: Path, *, synchronous: str = "NORMAL",
                 clock: Callable[[], float] = time.time, queue_limit: int = QUEUE_LIMIT,
                 commit_delay: float = COMMIT_DELAY) -> None:
        self.path = Path(path)
        self._clock = clock
        self._synchronous = synchronous
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._unsettled = Unsettled()
        self._cache = ReadCache()
        self._events_since_prune = 0
        try:
            self.path.parent.mkdir(mode=statedir.DIR_MODE, parents=True, exist_ok=True)
            statedir.private_file(self.path)  # its -wal and -shm files get the same mode
            db = self._connect()
            self._migrate(db)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open registry {self.path}: {exc}") from exc
        self._writer = RegistryWriter(db, boot_events.append_batch,
                                      on_commit=self._committed,
                                      queue_limit=queue_limit, commit_delay=commit_delay,
                                      name=f"registry {self.path}")
        self._db()

    # -- plumbing ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                             timeout=10.0)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    def _db(self) -> sqlite3.Connection:
        """This thread's read connection."""
        try:
            return self._local.db  # type: ignore[no-any-return]
        except AttributeError:
            pass
        try:
            db = self._connect()
            db.execute("PRAGMA query_only=1")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open registry {self.path}: {exc}") from exc
        with self._readers_lock:
            self._readers.append(db)
        self._local.db = db
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(f"registry {self.path} has schema {version}, newer than this "
                             f"program knows ({len(MIGRATIONS)})", hint="upgrade configserver")
        for number in range(version, len(MIGRATIONS)):
            with _transaction(db):
                for statement in split_sql(MIGRATIONS[number]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={number + 1}")
            log.info("registry schema migrated to version %d", number + 1)
        with _transaction(db):
            db.executemany("INSERT OR IGNORE INTO roles VALUES (?,?,?,?,?,?,1)",
                           [(r.name, r.image, str(r.template), r.kernel_args,
                             r.hypervisor_args, r.description) for r in BUILTIN_ROLES])

    def _run(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        return self._writer.run(partial(fn, **kwargs))

    def _committed(self, seq: int, written: int) -> None:
        if seq:  # jobs ran: any node may have changed (first the cache, then the overlay)
            self._cache.invalidate()
            self._unsettled.settled(seq)
        self._events_since_prune += written
        if self._events_since_prune >= PRUNE_AFTER and self._writer.maintenance is None:
            self._events_since_prune = 0
            self._writer.maintenance = PrunePass(kept=EVENTS_KEPT_PER_NODE)

    def flush(self) -> None:
        """Commit every queued write now, in this thread (tests; ``close`` does it too)."""
        self._writer.flush()

    def close(self) -> None:
        """Commit every queued write, then close the connections."""
        self._writer.close()
        with self._readers_lock:
            for db in self._readers:
                db.close()
            self._readers.clear()

    @property
    def writer(self) -> RegistryWriter:
        return self._writer

    def _now(self) -> float:
        return float(self._clock())

    # -- hot path ---------------------------------------------------------------------------

    def lookup(self, mac: str) -> Node | None:
        node = self._cache.get(("mac", mac), self._node_with_nic, mac)
        if node is None:
            found = self._unsettled.discovered.get(mac)
            return found[1] if found else None
        return self._unsettled.over(node)

    def lookup_ip(self, ip: str) -> Node | None:
        return self._unsettled.over(self._cache.get(("ip", ip), self._node_with_ip, ip))

    def role(self, name: str) -> Role | None:
        return self._cache.get(("role", name), self._role, name)

    def unknown_mac_policy(self) -> UnknownMacPolicy:
        return self._cache.get(("unknown_mac",), self._unknown_mac_policy)

    def _node_with_nic(self, mac: str) -> Node | None:
        # Every node's primary MAC has a NIC row too, so one indexed query finds it.
        db = self._db()
        row = db.execute("SELECT node FROM nics WHERE mac=?", (mac,)).fetchone()
        return load(db, row[0]) if row else None

    def _node_with_ip(self, ip: str) -> Node | None:
        db = self._db()
        row = db.execute("SELECT node FROM nics WHERE ip=?", (ip,)).fetchone()
        return load(db, row[0]) if row else None

    def _role(self, name: str) -> Role | None:
        row = self._db().execute("SELECT * FROM roles WHERE name=?", (name,)).fetchone()
        return role_from_row(row) if row else None

    def _unknown_mac_policy(self) -> UnknownMacPolicy:
        row = self._db().execute(
            "SELECT value FROM settings WHERE key='unknown_mac'").fetchone()
        return UnknownMacPolicy(row["value"]) if row else UnknownMacPolicy.IGNORE

    # -- nodes ------------------------------------------------------------------------------

    def list_nodes(self, *, state: NodeState | None = None, limit: int | None = None,
                   after: str | None = None) -> list[Node]:
        """Nodes in MAC order: at most ``limit``, those after MAC ``after`` (a page)."""
        db = self._db()
        with self._unsettled.lock:
            changed = dict(self._unsettled.states)
            discovered = {m: n for m, (_, n) in self._unsettled.discovered.items()}
        wanted = str(state) if state is not None else None
        cursor, result = after or "", []
        while limit is None or len(result) < limit:
            rows = load_page(db, after=cursor, state=wanted, also=list(changed),
                             limit=-1 if limit is None else limit)
            end = rows[-1].mac if limit is not None and len(rows) == limit else None
            page = {n.mac: n for n in rows}
            page.update((m, n) for m, n in discovered.items()
                        if m > cursor and (end is None or m <= end) and m not in page)
            for mac in sorted(page):
                node = page[mac]
                if mac in changed:
                    node = replace(node, state=changed[mac][1])
                if wanted is None or node.state == wanted:
                    result.append(node)
            if end is None:
                break
            cursor = end
        return result if limit is None else result[:limit]

    def add_node(self, spec: NodeSpec) -> Node:
        return self._run(nodes.add_node, spec=spec.normalized(), now=self._now())

    def update_node(self, mac: str, changes: dict[str, Any]) -> Node:
        return self._run(nodes.update_node, mac=normalize_mac(mac), changes=changes,
                         now=self._now())

    def remove_node(self, mac: str) -> None:
        self._run(nodes.remove_node, mac=normalize_mac(mac), now=self._now())

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
        return self._run(nodes.apply, specs=normalized, roles=wanted_roles, prune=prune,
                         now=self._now())

    # -- roles ------------------------------------------------------------------------------

    def list_roles(self) -> list[Role]:
        return [role_from_row(r)
                for r in self._db().execute("SELECT * FROM roles ORDER BY name")]

    def add_role(self, role: Role) -> Role:
        return self._run(nodes.add_role, new=validated_role(role))

    def update_role(self, name: str, changes: dict[str, Any]) -> Role:
        return self._run(nodes.update_role, name=name, changes=changes)

    def remove_role(self, name: str) -> None:
        self._run(nodes.remove_role, name=name)

    def set_unknown_mac_policy(self, policy: UnknownMacPolicy) -> None:
        self._run(nodes.set_unknown_mac_policy, policy=UnknownMacPolicy(policy))

    # -- what the servers record ------------------------------------------------------------

    def discover(self, mac: str, facts: dict[str, Any]) -> Node:
        """Record an unknown MAC as a pending node (idempotent; keeps the first-seen time).

        Queued, not waited for; ``lookup`` and ``list_nodes`` show the node at once.
        """
        now = self._now()
        known = self.lookup(mac)
        job = partial(nodes.discover, mac=mac, facts=facts, now=now, max_pending=MAX_PENDING)
        if known is not None:
            self._writer.submit(job)  # seen again: its last_seen
            return known
        pending = nodes.pending_count(self._db()) + len(self._unsettled.discovered)
        if pending >= MAX_PENDING:
            raise TooManyPending(
                f"{pending} machines are already waiting to be registered; {mac} is not "
                "recorded", hint="register or remove pending nodes (node list --pending)")
        node = Node(mac=mac, role=None, hostname=None, nics=(Nic(mac),),
                    state=NodeState.PENDING, created=now, updated=now, last_seen=now,
                    facts={"first_seen": now, **facts})

        def mark(seq: int) -> None:
            with self._unsettled.lock:
                self._unsettled.discovered[mac] = (seq, node)

        self._writer.submit(job, mark=mark)
        return node

    def purge_pending(self, older_than: float | None = None) -> list[str]:
        """Remove the pending nodes not seen for ``older_than`` seconds (all if None); their
        MACs. Waits for the commit: call it off the event loop."""
        cutoff = None if older_than is None else self._now() - older_than
        return self._run(nodes.purge_pending, cutoff=cutoff)

    def record_event(self, mac: str, stage: str, detail: dict[str, Any] | None = None,
                     *, booting: bool = False) -> None:
        """Queue a boot event of ``mac`` (ignored unless it names a node); never waits.

        ``booting``: a boot began (a DHCP exchange): a registered or lost node enters
        ``booting``. A ready node stays ready: anyone on the boot network can send a DHCP
        packet naming its MAC, so only its agent's session decides that it rebooted.
        """
        now = self._now()
        self._writer.append((mac, now, stage, detail or {}))
        if not booting:
            return
        node = self.lookup(mac)
        if node is None or node.state not in boot_events.MAY_ENTER_BOOTING:
            return

        def mark(seq: int) -> None:
            with self._unsettled.lock:
                self._unsettled.states[node.mac] = (seq, NodeState.BOOTING)

        self._writer.submit(partial(boot_events.enter_booting, mac=node.mac, when=now),
                            mark=mark)

    def events(self, mac: str, limit: int = 500) -> list[BootEvent]:
        """The newest ``limit`` events of the node, oldest first.

        Commits what is queued first, so that it shows every event recorded before the call:
        that takes one commit, so call it off the event loop.
        """
        self._writer.flush()
        db = self._db()
        return boot_events.read(db, owner(db, mac) or mac, limit)

    def set_state(self, mac: str, state: NodeState, reason: str = "") -> None:
        self._run(nodes.set_state, mac=mac, state=NodeState(state), reason=reason,
                  now=self._now())

    # -- agent sessions ---------------------------------------------------------------------

    def agent_session(self, mac: str) -> AgentSession | None:
        return sessions.session(self._db(), mac)

    def agent_session_by_token(self, token_hash: str) -> AgentSession | None:
        return sessions.by_token(self._db(), token_hash)

    def start_agent_session(self, mac: str, boot_id: str, token_hash: str | None) -> None:
        self._run(sessions.start, mac=mac, boot_id=boot_id, token_hash=token_hash,
                  now=self._now())

    def record_heartbeat(self, mac: str, status: dict[str, Any]) -> Node:
        return self._run(sessions.heartbeat, mac=mac, status=status, now=self._now())

    def set_inventory(self, mac: str, inventory: dict[str, Any]) -> None:
        self._run(sessions.set_inventory, mac=mac, inventory=inventory, now=self._now())

    def inventory(self, mac: str) -> dict[str, Any] | None:
        return sessions.inventory(self._db(), mac)

    def mark_lost(self, silent_since: float) -> list[str]:
        return self._run(sessions.mark_lost, silent_since=silent_since, now=self._now())

    # -- users ------------------------------------------------------------------------------

    def add_user(self, name: str, kind: str, tenant: str | None, serial: int,
                 not_after: float) -> User:
        return self._run(users.add, name=name, kind=kind, tenant=tenant, serial=serial,
                         not_after=not_after, now=self._now())

    def users(self) -> list[User]:
        return users.list_all(self._db())

    def user(self, name: str) -> User | None:
        return users.get(self._db(), name)

    def revoke_user(self, name: str) -> User:
        return self._run(users.revoke, name=name, now=self._now())

    def revoked_certificates(self) -> list[tuple[int, float]]:
        return users.revoked(self._db())


__all__ = ["MAX_PENDING", "MIGRATIONS", "SqliteRegistry"]
