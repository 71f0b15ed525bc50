"""The cloud generation on the event loop: long polls wait here, writers publish here.

The registry keeps the generation (bumped in the same transaction as every desired-state
change); this keeps the newest value this process has seen, and wakes every waiting
``GET /api/v1/agent/work`` when it moves. Waiting holds no thread and no connection: one
``asyncio.Event`` per generation, set (and replaced) when the next one is published.
Use it on the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib


class GenerationNotifier:
    def __init__(self, generation: int = 0) -> None:
        self.generation = generation
        self._moved: asyncio.Event | None = None

    def publish(self, generation: int) -> None:
        """The registry's generation is now ``generation`` (older values are ignored)."""
        if generation <= self.generation:
            return
        self.generation = generation
        moved, self._moved = self._moved, None
        if moved is not None:
            moved.set()

    async def wait(self, after: int, timeout: float) -> int:
        """The generation once it differs from ``after``, or after ``timeout`` seconds."""
        if self.generation != after or timeout <= 0:
            return self.generation
        if self._moved is None:
            self._moved = asyncio.Event()
        moved = self._moved
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(moved.wait(), timeout)
        return self.generation


__all__ = ["GenerationNotifier"]
