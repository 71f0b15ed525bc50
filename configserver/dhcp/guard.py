"""What keeps unregistered clients from starving the DHCP server; pure bookkeeping, no I/O.

* ``TokenBuckets``: new unregistered clients may take addresses at a bounded rate per relay
  (giaddr) and per local port, in constant memory.
* ``UnknownHolders``: which unregistered MACs hold an address of a pool (offered or bound) and
  until when, so that their number can be capped at a share of the pool.
* ``Window``: at most N events per fixed time window (new pending nodes in discovery).

The clock is passed in (``time.monotonic`` in the server, a fake one in tests).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable

BUCKETS_KEPT = 1024


class TokenBuckets:
    """One token bucket per key (``rate`` tokens per second, at most ``burst``), LRU-bounded."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float], *,
                 limit: int = BUCKETS_KEPT) -> None:
        self.rate = rate
        self.burst = burst
        self.limit = limit
        self.refused = 0
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key: tokens, at

    def take(self, key: str) -> bool:
        """Take one token from ``key``'s bucket; False (and counted) if it is empty."""
        now = self._clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        if len(self._buckets) > self.limit:
            self._buckets.popitem(last=False)
        if not ok:
            self.refused += 1
        return ok

    def __len__(self) -> int:
        return len(self._buckets)


class UnknownHolders:
    """Unregistered MACs holding an address of one pool, each until its offer or lease ends."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit  # None: no limit
        self._until: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def hold(self, mac: str, until: float) -> None:
        self._until[mac] = until
        heapq.heappush(self._heap, (until, mac))
        if len(self._heap) > 2 * len(self._until) + 64:
            self._heap = [(t, m) for m, t in self._until.items()]
            heapq.heapify(self._heap)

    def drop(self, mac: str) -> None:
        self._until.pop(mac, None)

    def holds(self, mac: str, now: float) -> bool:
        until = self._until.get(mac)
        return until is not None and until > now

    def count(self, now: float) -> int:
        """How many MACs hold an address at ``now`` (expired holds are forgotten)."""
        heap, until = self._heap, self._until
        while heap and heap[0][0] <= now:
            at, mac = heapq.heappop(heap)
            if until.get(mac) == at:
                del until[mac]
        return len(until)

    def full(self, now: float) -> bool:
        held = self.count(now)  # also forgets the expired holds when there is no limit
        return self.limit is not None and held >= self.limit


class Window:
    """At most ``limit`` events per fixed window of ``seconds``."""

    def __init__(self, limit: int, seconds: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.seconds = seconds
        self.refused = 0
        self._clock = clock
        self._start = float("-inf")
        self._used = 0

    def take(self) -> bool:
        now = self._clock()
        if now - self._start >= self.seconds:
            self._start, self._used = now, 0
        if self._used >= self.limit:
            self.refused += 1
            return False
        self._used += 1
        return True
