"""The serials revoked so far, kept in memory by the server and replaced on every change."""

from __future__ import annotations

import time
from collections.abc import Callable


class Revocations:
    def __init__(self, revoked: list[tuple[int, float]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.replace(revoked or [])

    def replace(self, revoked: list[tuple[int, float]]) -> None:
        """Now revoked: ``revoked`` (serial, when); takes effect for the next request."""
        self.revoked = list(revoked)
        self.serials = frozenset(s for s, _ in self.revoked)
