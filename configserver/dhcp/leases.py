"""Durable DHCP leases: ``leases.sqlite`` in the state directory, one row per address.

The store keeps every lease in memory (the hot path never reads SQLite) and writes changes to
SQLite in group commits on a worker thread: callers stage changes, then ask to be called back
once everything staged so far is on disk (``when_durable``). An ACK is sent from that callback,
so a client is never told about a lease that a crash could forget. Offers are memory-only.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from configserver import statedir
from configserver.dhcp.errors import LeaseStoreError

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    ip TEXT PRIMARY KEY,
    mac TEXT NOT NULL,
    state TEXT NOT NULL,
    expires REAL NOT NULL,
    hostname TEXT,
    updated REAL NOT NULL
)
"""


class LeaseState(enum.StrEnum):
    OFFERED = "offered"  # held for a client between OFFER and REQUEST (memory only)
    BOUND = "bound"
    RELEASED = "released"
    DECLINED = "declined"  # a client found the address in use: quarantined until ``expires``


@dataclass(frozen=True, slots=True)
class Lease:
    ip: str
    mac: str
    state: LeaseState
    expires: float
    hostname: str | None = None

    def active(self, now: float) -> bool:
        """Whether the address is taken (by its holder, or by quarantine) at ``now``."""
        return self.state != LeaseState.RELEASED and self.expires > now


class LeaseStore:
    """Leases by address and by MAC (chaddr is the identity, whatever the client id says)."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time,
                 synchronous: str = "FULL", commit_delay: float = 0.002) -> None:
        self.path = Path(path)
        self.commit_delay = commit_delay
        self._clock = clock
        self._by_ip: dict[str, Lease] = {}
        self._by_mac: dict[str, Lease] = {}
        self._staged: dict[str, Lease] = {}
        self._waiting: list[Callable[[], None]] = []
        self._flushing = False
        self._flush_task: asyncio.Task[None] | None = None
        self._closed = False
        try:
            self.path.parent.mkdir(mode=statedir.DIR_MODE, parents=True, exist_ok=True)
            statedir.private_file(self.path)  # its -wal and -shm files get the same mode
            self._db = sqlite3.connect(str(self.path), isolation_level=None,
                                       check_same_thread=False, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute(SCHEMA)
            rows = self._db.execute(
                "SELECT ip, mac, state, expires, hostname FROM leases").fetchall()
        except (sqlite3.Error, OSError) as exc:
            raise LeaseStoreError(f"cannot open lease store {self.path}: {exc}") from exc
        for ip, mac, state, expires, hostname in rows:
            self._remember(Lease(ip, mac, LeaseState(state), expires, hostname))
        log.info("lease store %s: %d leases loaded", self.path, len(rows))

    # -- reads (memory) ---------------------------------------------------------------------

    def now(self) -> float:
        return float(self._clock())

    def by_ip(self, ip: str) -> Lease | None:
        return self._by_ip.get(ip)

    def by_mac(self, mac: str) -> Lease | None:
        """The MAC's current or most recent lease (never a quarantine record)."""
        return self._by_mac.get(mac)

    def __iter__(self) -> Iterator[Lease]:
        return iter(list(self._by_ip.values()))

    def __len__(self) -> int:
        return len(self._by_ip)

    def holder(self, ip: str) -> str | None:
        """The MAC an address is (or was last) leased to, for attributing traffic to a node."""
        lease = self._by_ip.get(ip)
        if lease is None or lease.state == LeaseState.DECLINED:
            return None
        return lease.mac

    def is_free_for(self, ip: str, mac: str) -> bool:
        """Whether ``mac`` may take ``ip``: nobody else holds it and it is not quarantined."""
        lease = self._by_ip.get(ip)
        if lease is None:
            return True
        if lease.state == LeaseState.DECLINED:
            return lease.expires <= self.now()
        return lease.mac == mac or not lease.active(self.now())

    # -- writes -----------------------------------------------------------------------------

    def offer(self, mac: str, ip: str, hold: float) -> Lease:
        """Hold ``ip`` for ``mac`` for ``hold`` seconds (not persisted; a bound lease stays)."""
        current = self._by_ip.get(ip)
        if current is not None and current.mac == mac and current.state == LeaseState.BOUND \
                and current.active(self.now()):
            return current
        lease = Lease(ip, mac, LeaseState.OFFERED, self.now() + hold)
        self._remember(lease)
        return lease

    def bind(self, mac: str, ip: str, lease_time: float, hostname: str | None = None) -> Lease:
        return self._stage(Lease(ip, mac, LeaseState.BOUND, self.now() + lease_time, hostname))

    def release(self, mac: str, ip: str) -> Lease | None:
        lease = self._by_ip.get(ip)
        if lease is None or lease.mac != mac or lease.state == LeaseState.DECLINED:
            return None
        return self._stage(replace(lease, state=LeaseState.RELEASED, expires=self.now()))

    def decline(self, mac: str, ip: str, quarantine: float) -> Lease:
        return self._stage(Lease(ip, mac, LeaseState.DECLINED, self.now() + quarantine))

    def purge(self, macs: set[str]) -> list[Lease]:
        """End the offers and leases ``macs`` hold now (an operator's purge); what ended."""
        now, ended = self.now(), []
        for lease in list(self._by_ip.values()):
            if lease.mac not in macs or lease.state == LeaseState.DECLINED \
                    or not lease.active(now):
                continue
            if lease.state == LeaseState.OFFERED:
                self._by_ip.pop(lease.ip, None)
                self._by_mac.pop(lease.mac, None)
            else:
                self._stage(replace(lease, state=LeaseState.RELEASED, expires=now))
            ended.append(lease)
        return ended

    def forget_offer(self, mac: str) -> None:
        """The client took another server's offer: free what we held for it."""
        lease = self._by_mac.get(mac)
        if lease is not None and lease.state == LeaseState.OFFERED:
            self._by_ip.pop(lease.ip, None)
            del self._by_mac[mac]

    def _remember(self, lease: Lease) -> None:
        previous = self._by_ip.get(lease.ip)
        if previous is not None and previous.mac != lease.mac \
                and self._by_mac.get(previous.mac) is previous:
            del self._by_mac[previous.mac]
        self._by_ip[lease.ip] = lease
        if lease.state == LeaseState.DECLINED:
            if self._by_mac.get(lease.mac) is previous and previous is not None:
                del self._by_mac[lease.mac]
            return
        old = self._by_mac.get(lease.mac)
        if old is not None and old.ip != lease.ip and self._by_ip.get(old.ip) is old:
            # One lease per MAC: moving it frees the old address.
            if old.state == LeaseState.OFFERED:
                del self._by_ip[old.ip]
            else:
                released = replace(old, state=LeaseState.RELEASED, expires=min(
                    old.expires, self.now()))
                self._by_ip[old.ip] = released
                self._staged[old.ip] = released
        self._by_mac[lease.mac] = lease

    def _stage(self, lease: Lease) -> Lease:
        self._remember(lease)
        self._staged[lease.ip] = lease
        return lease

    # -- group commit -----------------------------------------------------------------------

    def when_durable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) once every change staged so far is committed.

        Commits run on a worker thread one after another; changes staged while one runs go
        into the next, so many ACKs share one fsync. If a commit fails its callbacks are
        dropped (their ACKs are never sent) and the error is logged.
        """
        self._waiting.append(callback)
        if not self._flushing:
            self._flushing = True
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_loop())

    async def drain(self) -> None:
        """Wait for the commits in flight (and their callbacks) to finish."""
        while self._flush_task is not None and not self._flush_task.done():
            await asyncio.shield(self._flush_task)

    async def _flush_loop(self) -> None:
        try:
            while self._waiting:
                # Let the answers to datagrams already queued join this commit: a short wait
                # buys many ACKs per fsync under load and costs one client a few ms.
                await asyncio.sleep(self.commit_delay)
                batch, self._staged = self._staged, {}
                callbacks, self._waiting = self._waiting, []
                try:
                    await asyncio.to_thread(self._write, list(batch.values()))
                except (sqlite3.Error, OSError) as exc:
                    # Keep the leases staged (newer changes win) so that memory and disk
                    # agree again at the next commit; the clients retry and get their ACK then.
                    self._staged = {**batch, **self._staged}
                    log.error("lease store %s: commit of %d leases failed, %d answers dropped:"
                              " %s", self.path, len(batch), len(callbacks), exc)
                    continue
                for callback in callbacks:
                    try:
                        callback()
                    except Exception:
                        log.exception("sending a committed DHCP answer failed")
        finally:
            self._flushing = False

    def flush(self) -> None:
        """Commit staged changes now, synchronously (shutdown, tests)."""
        batch, self._staged = self._staged, {}
        try:
            self._write(list(batch.values()))
        except sqlite3.Error as exc:
            raise LeaseStoreError(f"lease store {self.path}: commit failed: {exc}") from exc

    def _write(self, leases: list[Lease]) -> None:
        if not leases:
            return
        now = time.time()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT OR REPLACE INTO leases (ip, mac, state, expires, hostname, updated) "
                "VALUES (?,?,?,?,?,?)",
                [(x.ip, x.mac, str(x.state), x.expires, x.hostname, now) for x in leases])
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            self._db.close()
