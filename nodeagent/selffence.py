"""Self-fencing: a dom0 that the config server has not heard from for too long destroys its
guests itself.

The control plane declares a dom0 lost after ``lost_after`` seconds without a heartbeat,
fences it at the storage and restarts its guests elsewhere. The storage fence alone keeps a
guest from writing twice; this is the second line, for a fence that comes late: the dom0's
heartbeat answers carry ``self_fence_after`` (below ``lost_after``), and once no heartbeat
was accepted for that long the agent destroys every guest here. The limit is kept in the
state directory, so an agent restarted while cut off still knows it; the clock starts at
the agent's start (monotonic time) when nothing was accepted yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)

CHECK_PERIOD = 2.0
FILE = "self_fence.json"

Fence = Callable[[str], Awaitable[int]]  # reason -> how many guests were destroyed


class SelfFence:
    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = state_dir / FILE
        self._clock = clock
        self.contact = clock()
        self.limit = self._load()
        self.fenced = 0  # guests destroyed by self-fencing, since the agent started
        self._silent = False

    def _load(self) -> float | None:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            value = json.loads(self._path.read_text())["self_fence_after"]
            return float(value) if value else None
        return None

    def accepted(self, limit: object) -> None:
        """A heartbeat was accepted; ``limit`` is its answer's ``self_fence_after``."""
        self.contact = self._clock()
        if self._silent:
            log.info("heartbeats accepted again: self-fencing stands down")
            self._silent = False
        try:
            value = float(limit) if limit is not None and not isinstance(limit, bool) else None
        except (TypeError, ValueError):
            value = None
        value = value if value and value > 0 else None
        if value != self.limit:
            self.limit = value
            with contextlib.suppress(OSError):
                self._path.write_text(json.dumps({"self_fence_after": value}))

    def due(self) -> float | None:
        """Seconds without an accepted heartbeat, if past the limit; else None."""
        silence = self._clock() - self.contact
        return silence if self.limit is not None and silence > self.limit else None

    async def run(self, fence: Fence, period: float = CHECK_PERIOD) -> None:
        """Check every ``period`` seconds; past the limit, ``fence`` at every check (a guest
        that came back meanwhile goes too) until a heartbeat is accepted again."""
        while True:
            await asyncio.sleep(period)
            silence = self.due()
            if silence is None:
                continue
            reason = f"no heartbeat accepted for {silence:.0f} s (limit {self.limit:g} s)"
            if not self._silent:
                log.warning("%s: destroying every guest here", reason)
                self._silent = True
            try:
                destroyed = await fence(reason)
            except Exception:  # xl failing must not end the watch
                log.exception("self-fencing failed; trying again in %.0f s", period)
                continue
            self.fenced += destroyed
            if destroyed:
                log.warning("self-fenced: %d guests destroyed", destroyed)


async def destroy_guests(reason: str) -> int:
    """``xl destroy`` every domain named like an instance; how many (no role needed)."""
    from nodeagent.roles import xen
    from nodeagent.roles.guests import DOMAIN_PREFIX

    doomed = [d.name for d in await xen.domains()
              if d.name.startswith(DOMAIN_PREFIX) and d.state != "dying"]
    for name in doomed:
        await xen.destroy(name)
        log.warning("guest %s destroyed: self-fenced: %s", name, reason)
    return len(doomed)


__all__ = ["SelfFence", "destroy_guests"]
