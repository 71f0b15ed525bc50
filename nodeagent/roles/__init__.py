"""What each role does for the cloud: reconcile its node toward the control plane's desired
state and report what is.

The loop (``Reconciler``) long-polls ``/api/v1/agent/work`` (the config server never opens a
connection into a node), hands the role's part of the answer to the role, and posts the role's
report of actual state to ``/api/v1/agent/report``. It runs a pass on every new generation of
the work, and at least every ``resync_interval`` seconds anyway (so drift, such as a leg that
came back, is repaired without a change on the server); a pass never assumes the previous one
finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nodeagent.errors import ServerError

log = logging.getLogger(__name__)

POLL_WAIT = 25.0
BUSY_WAIT = 3.0
WATCH_PERIOD = 1.0


class Role(Protocol):
    name: str

    async def reconcile(self, work: dict[str, Any]) -> dict[str, Any]: ...
    def busy(self) -> bool: ...
    def fingerprint(self) -> object:
        """A cheap look at the node's actual state (sysfs only): a change means another
        pass now, without waiting for the control plane (a leg failed, a session dropped)."""
        ...
    def snapshot(self, work: dict[str, Any]) -> dict[str, Any] | None:
        """The report of actual state from sysfs alone (no tool runs), posted before the
        pass that follows a change: the control plane learns of a lost leg at once, not
        after the pass's slower steps (logins to a node that is gone)."""
        ...


@dataclass(frozen=True)
class ServerHooks:
    """What a role asks of the config server besides its work: a dom0 confirms a guest's
    claim (instance, epoch) just before ``xl create`` and fetches guest kernels."""

    confirm: Callable[[str, int], Awaitable[bool]]
    fetch: Callable[[str, Path], Awaitable[None]]
    # This boot's certificate, key and the server's CA as files (live migrations' stream).
    credentials: tuple[Path, Path, Path] | None = None


def role_for(name: str | None, hooks: ServerHooks | None = None) -> Role | None:
    """The cloud role of a node role, if it has one; a dom0 runs guests only with ``hooks``."""
    if name == "storage":
        from nodeagent.roles.storage import StorageRole
        return StorageRole()
    if name == "dom0":
        from nodeagent.roles import xen
        from nodeagent.roles.dom0 import Dom0Role
        from nodeagent.roles.dom0_guests import Guests
        from nodeagent.roles.migration import Credentials, Migrations
        if hooks is None:
            return Dom0Role(None)
        moves = Migrations(Credentials(*hooks.credentials) if hooks.credentials else None,
                           xen.exists, xen.unpause)
        return Dom0Role(Guests(xen, hooks.confirm, hooks.fetch, migrations=moves))
    return None


@dataclass
class ReconcileStatus:
    passes: int = 0
    generation: int | None = None
    last_pass: float | None = None
    last_duration: float | None = None
    last_error: str | None = None
    last_report: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"passes": self.passes, "generation": self.generation,
                "last_pass": self.last_pass, "last_duration": self.last_duration,
                "last_error": self.last_error, "report": self.last_report}


# (after generation, wait seconds) -> work message; (generation, role name, report) -> None
FetchWork = Callable[[int | None, float], Awaitable[dict[str, Any]]]
PostReport = Callable[[int | None, str, dict[str, Any]], Awaitable[None]]


class Reconciler:
    """Fetch work, reconcile, report; forever. Errors are logged and retried with backoff."""

    def __init__(self, role: Role, fetch: FetchWork, post: PostReport, *,
                 poll_wait: float = POLL_WAIT, backoff_max: float = 30.0) -> None:
        self.role = role
        self.status = ReconcileStatus()
        self._fetch = fetch
        self._post = post
        self._poll_wait = poll_wait
        self._backoff_max = backoff_max

    async def run(self) -> None:
        generation: int | None = None
        failures = 0
        work: dict[str, Any] | None = None
        while True:
            # A role may look more often than the long poll's wait (a dom0 running guests
            # checks that nothing runs there without its claim every ``resync`` seconds).
            resync = getattr(self.role, "resync", None) or self._poll_wait
            wait = BUSY_WAIT if self.role.busy() or failures else min(self._poll_wait, resync)
            try:
                work, changed = await self._next_work(generation, wait, work)
                generation = int(work.get("generation") or 0)
                snapshot = self.role.snapshot(work.get(self.role.name) or {}) if changed else None
                if snapshot is not None:
                    await self._post(generation, self.role.name, snapshot)
                started = time.monotonic()
                report = await self.role.reconcile(work.get(self.role.name) or {})
                self.status.last_duration = round(time.monotonic() - started, 3)
                await self._post(generation, self.role.name, report)
            except asyncio.CancelledError:
                raise
            except ServerError as exc:  # TokenRejected too: the heartbeat loop looks up again
                failures += 1
                self.status.last_error = exc.message
                delay = min(self._backoff_max, 0.5 * 2 ** min(failures, 6))
                log.warning("%s role: %s; again in %.1fs", self.role.name, exc.message, delay)
                generation = None
                await asyncio.sleep(delay)
                continue
            except Exception as exc:  # a bug in one pass must not end reconciling for good
                failures += 1
                self.status.last_error = f"{type(exc).__name__}: {exc}"
                delay = min(self._backoff_max, 0.5 * 2 ** min(failures, 6))
                log.exception("%s role: reconcile pass failed; again in %.1fs",
                              self.role.name, delay)
                generation = None
                await asyncio.sleep(delay)
                continue
            failures = 0
            self.status.passes += 1
            self.status.generation = generation
            self.status.last_pass = time.time()
            self.status.last_error = None
            self.status.last_report = report

    async def _next_work(self, generation: int | None, wait: float,
                         last: dict[str, Any] | None) -> tuple[dict[str, Any], bool]:
        """The long poll's answer, or the last work again as soon as the node's actual state
        changes under it (whichever comes first; True then)."""
        fetch = asyncio.create_task(self._fetch(generation, wait))
        if last is None:
            return await fetch, False
        watch = asyncio.create_task(self._changed(self.role.fingerprint()))
        try:
            done, _ = await asyncio.wait({fetch, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (fetch, watch):
                if not task.done():
                    task.cancel()
            await asyncio.gather(fetch, watch, return_exceptions=True)
        if fetch in done:
            return fetch.result(), False
        log.info("%s role: the node's state changed; reconciling again", self.role.name)
        return last, True

    async def _changed(self, before: object) -> None:
        while True:
            await asyncio.sleep(WATCH_PERIOD)
            if self.role.fingerprint() != before:
                return
