"""Rate-limited logging for what the network sends us: bad packets must not flood the log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


def worth_logging(count: int) -> bool:
    """Whether the ``count``-th repeat of a failure gets a log line: 1, 10, 100, every 1000."""
    return count in (1, 10, 100) or count % 1000 == 0


class RateLimitedLog:
    """At most ``burst`` warnings per ``interval`` seconds; then one line counting the rest.

    One budget for all messages, so spoofed sources cannot multiply it, and constant memory.
    """

    def __init__(self, logger: logging.Logger, *, burst: int = 10, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._window_start = -interval
        self._emitted = 0
        self.suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = self._clock()
        if now - self._window_start >= self._interval:
            if self.suppressed:
                self._logger.warning("%d more such messages suppressed in the last %.0f s",
                                     self.suppressed, now - self._window_start)
            self._window_start, self._emitted, self.suppressed = now, 0, 0
        if self._emitted < self._burst:
            self._emitted += 1
            self._logger.warning(message, *args)
        else:
            self.suppressed += 1
