"""The registry's one writing connection, fed through a queue and committed in batches.

Two kinds of writes share one queue, in the order they were made:

* **events** (``append``): fire-and-forget boot events. Once ``queue_limit`` writes are queued
  an event is dropped and counted (``dropped``), never waited for.
* **jobs** (``submit``, ``run``): functions of the connection that change state. A job is never
  dropped; each runs inside a savepoint, so a job that fails (a refused write) leaves the others
  of its batch alone.

Whoever commits takes everything queued so far, in order, into one transaction: the flush task
on the event loop (``commit_delay`` after the first write of a batch, on a worker thread, so the
loop never waits for SQLite), or a thread calling ``run`` (it wants its own job's outcome, and
commits what was queued before it first, keeping the order). A caller without a running event
loop in its thread commits at once. After each commit ``on_commit(seq, events)`` reports the
sequence number of the last job now on disk and how many events were written.

Between batches the flush task runs the ``maintenance`` steps (event pruning), each a short
transaction of its own, so a large clean-up never holds the connection for long.

Crash safety: a batch is one transaction, so it is on disk whole or not at all. What is still
queued when the process dies is lost (a few milliseconds of events and state changes); a clean
``close`` commits everything queued first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from configserver.errors import NetbootError, StoreError
from configserver.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

T = TypeVar("T")
Event = tuple[str, float, str, dict[str, Any]]  # mac, time, stage, detail
WriteEvents = Callable[[sqlite3.Connection, list[Event]], int]

QUEUE_LIMIT = 20_000
COMMIT_DELAY = 0.005  # seconds between a batch's first write and its commit
STEP_PAUSE = 0.001  # seconds between two maintenance steps, for batches to go first


class Maintenance(Protocol):
    def step(self, db: sqlite3.Connection) -> bool:
        """Do one bounded piece of work inside the caller's transaction; False when done."""
        ...


@dataclass(slots=True)
class Job:
    seq: int
    fn: Callable[[sqlite3.Connection], Any]
    outcome: concurrent.futures.Future[Any] | None = None


class RegistryWriter:
    """Batches of boot events and jobs, committed in order on one connection."""

    def __init__(self, db: sqlite3.Connection, write_events: WriteEvents, *,
                 on_commit: Callable[[int, int], None] = lambda seq, events: None,
                 queue_limit: int = QUEUE_LIMIT, commit_delay: float = COMMIT_DELAY,
                 name: str = "registry") -> None:
        self.queue_limit = queue_limit
        self.commit_delay = commit_delay
        self.maintenance: Maintenance | None = None
        self.dropped = 0  # events refused because the queue was full
        self.lost = 0  # events and jobs whose commit failed
        self.written = 0  # events committed
        self.commits = 0  # batches committed
        # (operation, seconds): "commit" for each batch, "write" for each ``run`` as its
        # caller waited for it (metrics; called in the committing thread).
        self.on_timing: Callable[[str, float], None] | None = None
        self._db = db
        self._name = name
        self._write_events = write_events
        self._on_commit = on_commit
        self._commit_lock = threading.Lock()  # held while the connection is in use
        self._queue_lock = threading.Lock()  # held while the queue or seq changes
        self._queue: deque[Event | Job] = deque()
        self._seq = 0
        self._task: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        self._full = RateLimitedLog(log, burst=1, interval=10.0)

    # -- writes -----------------------------------------------------------------------------

    def append(self, event: Event) -> bool:
        """Queue one boot event; False if the queue is full (the event is dropped, counted)."""
        queue = self._queue
        if self._closed or len(queue) >= self.queue_limit:
            self.dropped += 1
            if not self._closed:
                self._full.warning("%s: %d writes queued, writer behind: boot event dropped "
                                   "(%d dropped so far)", self._name, len(queue), self.dropped)
            return False
        queue.append(event)
        if len(queue) == 1:
            self._kick()  # the first of a batch; the others find its commit on the way
        return True

    def submit(self, fn: Callable[[sqlite3.Connection], Any], *,
               mark: Callable[[int], None] | None = None) -> int:
        """Queue a job (fire-and-forget, never dropped); returns its sequence number.

        ``mark(seq)`` runs before the job can be committed: the caller records what the job
        will change under that number, to be forgotten at ``on_commit``.
        """
        with self._queue_lock:
            if self._closed:
                raise StoreError(f"{self._name} is closed")
            self._seq += 1
            seq = self._seq
            if mark is not None:
                mark(seq)
            self._queue.append(Job(seq, fn))
        self._kick()
        return seq

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Commit everything queued, then ``fn`` in the same transaction; its result or error.

        Blocks the calling thread for one commit: from the event loop, call it through
        ``asyncio.to_thread``.
        """
        outcome: concurrent.futures.Future[T] = concurrent.futures.Future()
        started = time.perf_counter()
        with self._commit_lock:
            with self._queue_lock:
                if self._closed:
                    raise StoreError(f"{self._name} is closed")
                self._seq += 1
                batch = self._take()
                batch.append(Job(self._seq, fn, outcome))
            self._commit(batch)
        if self.on_timing is not None:
            self.on_timing("write", time.perf_counter() - started)
        return outcome.result()

    def flush(self) -> None:
        """Commit everything queued now, in this thread (shutdown, tests)."""
        with self._commit_lock:
            self._commit_queued_locked()

    def close(self) -> None:
        """Commit everything queued, then close the connection (idempotent)."""
        with self._commit_lock:
            if self._closed:
                return
            with self._queue_lock:
                self._closed = True  # from now on, writes are refused
                batch = self._take()
            if batch:
                self._commit(batch)
            self._db.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self.dropped or self.lost:
            log.warning("%s: %d boot events were dropped (queue full) and %d writes lost "
                        "(failed commits)", self._name, self.dropped, self.lost)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- committing -------------------------------------------------------------------------

    def _kick(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # no event loop in this thread: nothing to wait for
            return
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            self._task = loop.create_task(self._flush_loop(), name="registry-writer")

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if self._queue:
                # Let the writes of the datagrams already waiting join this batch.
                await asyncio.sleep(self.commit_delay)
                work = self.flush
            elif self.maintenance is not None:
                await asyncio.sleep(STEP_PAUSE)
                work = self._maintain
            else:
                return
            if self._closed:
                return
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="registry-writer")
            await loop.run_in_executor(self._executor, work)

    def _maintain(self) -> None:
        with self._commit_lock:
            work = self.maintenance
            if work is None or self._closed:
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    more = work.step(self._db)
                    self._db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                log.error("%s: maintenance step failed, stopped: %s", self._name, exc)
                more = False
            if not more:
                self.maintenance = None

    def run_maintenance(self) -> int:
        """Run the pending maintenance to its end in this thread; the number of steps."""
        steps = 0
        while self.maintenance is not None and not self._closed:
            self._maintain()
            steps += 1
        return steps

    def _take(self) -> list[Event | Job]:
        # One item at a time: events are appended without the queue lock.
        queue, batch = self._queue, []
        while queue:
            batch.append(queue.popleft())
        return batch

    def _commit_queued_locked(self) -> None:
        with self._queue_lock:
            if not self._queue or self._closed:
                return
            batch = self._take()
        self._commit(batch)

    def _commit(self, batch: list[Event | Job]) -> None:
        """One transaction for ``batch``, in order; settles every job's outcome."""
        db = self._db
        outcomes: list[tuple[Job, bool, Any]] = []
        events: list[Event] = []
        written = 0
        started = time.perf_counter()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for item in batch:
                    if type(item) is tuple:
                        events.append(item)
                        continue
                    if events:
                        written += self._write_events(db, events)
                        events = []
                    outcomes.append(self._run_job(db, item))  # type: ignore[arg-type]
                if events:
                    written += self._write_events(db, events)
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            jobs = [item for item in batch if type(item) is Job]
            self.lost += len(batch)
            log.error("%s: commit of %d events and %d writes failed: %s", self._name,
                      len(batch) - len(jobs), len(jobs), exc)
            error = StoreError(f"registry write failed: {exc}")
            for job in jobs:
                if job.outcome is not None:
                    job.outcome.set_exception(error)
            if jobs:
                self._on_commit(jobs[-1].seq, 0)  # what they promised will not happen
            return
        self.written += written
        self.commits += 1
        if self.on_timing is not None:
            self.on_timing("commit", time.perf_counter() - started)
        last = 0
        for job, ok, value in outcomes:
            last = job.seq
            if job.outcome is None:
                if not ok:
                    log.warning("%s: queued write refused: %s", self._name, value)
            elif ok:
                job.outcome.set_result(value)
            else:
                job.outcome.set_exception(value)
        self._on_commit(last, written)

    def _run_job(self, db: sqlite3.Connection, job: Job) -> tuple[Job, bool, Any]:
        db.execute("SAVEPOINT job")
        try:
            value = job.fn(db)
        except Exception as exc:
            # A refused write (or a bug) undoes itself only; the batch goes on. A failure
            # that ended the whole transaction makes this raise, and the batch fails.
            db.execute("ROLLBACK TO job")
            db.execute("RELEASE job")
            if isinstance(exc, sqlite3.Error):
                exc = StoreError(f"registry write failed: {exc}")
            elif not isinstance(exc, NetbootError):
                log.error("%s: write failed", self._name, exc_info=exc)
            return job, False, exc
        db.execute("RELEASE job")
        return job, True, value


__all__ = ["COMMIT_DELAY", "QUEUE_LIMIT", "Event", "Maintenance", "RegistryWriter"]
