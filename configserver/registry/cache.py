"""Recent answers of the registry's hot-path reads (a node by MAC or address, a role, the
unknown-MAC policy), so that a DHCP exchange does not cost SQLite queries per packet.

Each answer is kept ``ttl`` seconds at most, and every write of this process that can change
one empties the cache first (``invalidate``, from the writer, right after the commit), so an
answer never outlives a write of this process. What expires with ``ttl`` is what changes
without such a write: a node's ``last_seen`` (every boot event moves it) and a write by
another process on the same database file.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

TTL = 2.0
LIMIT = 65536  # answers kept at most (spoofed MACs must not grow it): then it starts over


class ReadCache:
    def __init__(self, *, ttl: float = TTL, limit: int = LIMIT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.limit = limit
        self.hits = 0
        self.misses = 0
        self._clock = clock
        self._entries: dict[Hashable, tuple[float, Any]] = {}
        self._generation = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[..., T], *args: Any) -> T:
        """The answer for ``key``: remembered, or ``load(*args)`` (then remembered)."""
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and entry[0] > now:
            self.hits += 1
            return entry[1]  # type: ignore[no-any-return]
        self.misses += 1
        generation = self._generation
        value = load(*args)
        with self._lock:
            # Not if a write committed while we read: what we read may predate it.
            if generation == self._generation:
                if len(self._entries) >= self.limit:
                    self._entries.clear()
                self._entries[key] = (now + self.ttl, value)
        return value

    def invalidate(self) -> None:
        """A write committed: forget every answer (and any being read meanwhile)."""
        with self._lock:
            self._generation += 1
            self._entries.clear()


__all__ = ["ReadCache"]
