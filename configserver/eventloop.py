"""An asyncio event loop that may poll for a moment instead of sleeping.

A lock-step exchange (a TFTP client that acknowledges each block before it gets the next)
leaves the server with nothing to do for the few tens of microseconds until the next packet.
Sleeping in ``epoll_wait`` for that gap costs a wake-up per packet, and on a virtual machine
whose idle vCPUs halt that wake-up is longer than the exchange itself. ``PollingSelector``
lets a component that expects an event very soon say so (``expect(until)``); until then, when
the loop has nothing to run, the selector polls (``epoll_wait`` with a zero timeout, then
``sched_yield``) instead of sleeping. It is the kernel's busy polling (``SO_BUSY_POLL``) and
the haltpoll cpuidle governor done for one process's event loop.

Polling does not hold up the loop's own work: asyncio asks for a zero timeout whenever
callbacks are ready, every round sees every registered descriptor (the self-pipe of
``call_soon_threadsafe`` and signals included), and polling stops at the timeout asyncio gave
(its next timer). It could hold up other threads of the process: a polling thread lets go of
the GIL only for a microsecond at a time, and a waiting thread may lose the race for it each
time. So ``PollingEventLoop`` holds polling off while any ``run_in_executor`` job (such as
``asyncio.to_thread``) is in flight. Polling costs CPU time, which matters when another task
wants this CPU: a round that returns far later than a round takes means the process was
descheduled, and polling is then off for ``backoff`` seconds.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# A poll round (epoll_wait, sched_yield, the clock) takes a few microseconds; one that takes
# longer than this was descheduled in between.
PREEMPTED_AFTER = 200e-6
BACKOFF = 1.0


class PollingSelector(selectors.EpollSelector):
    """An epoll selector that polls instead of sleeping until the time ``expect`` was given.

    ``clock`` must be the event loop's clock (``time.monotonic`` for asyncio's loops);
    ``relax`` runs between two polls. The counters are for tests and diagnostics.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 relax: Callable[[], None] = os.sched_yield,
                 preempted_after: float = PREEMPTED_AFTER, backoff: float = BACKOFF) -> None:
        super().__init__()
        self._clock = clock
        self._relax = relax
        self._preempted_after = preempted_after
        self._backoff = backoff
        self._until = 0.0
        self._off_until = 0.0
        self._holds = 0
        self.polls = 0
        self.caught = 0
        self.backoffs = 0

    def expect(self, until: float) -> None:
        """An event is likely before ``until`` (on ``clock``): poll for it until then."""
        self._until = max(self._until, until)

    def summary(self) -> str:
        return (f"event loop polled {self.polls} times, found events {self.caught} times, "
                f"backed off {self.backoffs} times")

    @property
    def held(self) -> bool:
        return self._holds > 0

    def hold(self) -> None:
        """Do not poll until the matching ``release`` (another thread needs the GIL)."""
        self._holds += 1

    def release(self) -> None:
        self._holds -= 1

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if not self._holds and (timeout is None or timeout > 0):
            start = self._clock()
            if start < self._until and start >= self._off_until:
                end = self._until if timeout is None else min(self._until, start + timeout)
                ready = self._poll(start, end)
                if ready:
                    return ready
                if timeout is not None:
                    timeout = max(0.0, timeout - (self._clock() - start))
        return super().select(timeout)

    def _poll(self, now: float, end: float) -> list[tuple[selectors.SelectorKey, int]]:
        poll = super().select
        while True:
            ready = poll(0)
            self.polls += 1
            if ready:
                self.caught += 1
                return ready
            self._relax()
            previous, now = now, self._clock()
            if now - previous > self._preempted_after:
                # Another task had this CPU: polling would take time from it. Sleep instead.
                self._off_until = now + self._backoff
                self.backoffs += 1
                return ready
            if now >= end:
                return ready


class PollingEventLoop(asyncio.SelectorEventLoop):
    """A selector event loop on a ``PollingSelector`` that does not poll while threads work."""

    def __init__(self, selector: PollingSelector | None = None) -> None:
        self.polling = selector or PollingSelector()
        super().__init__(self.polling)

    def run_in_executor(self, executor: Any, func: Callable[..., T],
                        *args: Any) -> asyncio.Future[T]:
        self.polling.hold()  # before the job can start
        try:
            future = super().run_in_executor(executor, func, *args)
        except BaseException:
            self.polling.release()
            raise
        future.add_done_callback(lambda _: self.polling.release())
        return future


def run(main: Callable[[PollingSelector], Coroutine[Any, Any, T]], *,
        selector: PollingSelector | None = None) -> T:
    """Like ``asyncio.run(main(selector))``, on a ``PollingEventLoop`` driven by ``selector``."""
    selector = selector or PollingSelector()
    with asyncio.Runner(loop_factory=lambda: PollingEventLoop(selector)) as runner:
        return runner.run(main(selector))
