"""What the dashboard shows, and the feed that pushes it to every open page.

``snapshot`` reads the registry once (``Registry.overview``: nodes with their dom0 reports'
memory, and instances, as plain rows; roles; volumes) and lays it out as the dashboard draws
it: nodes, the guest map (per dom0: its guests, memory used and free), instances and volumes
with their legs and sync progress. It reads SQLite: call it off the event loop.

``DashboardFeed`` runs one builder for all open pages: while anybody listens, every
``interval`` seconds it builds the snapshot in a worker thread and works out what changed
(``changes``, JSON encoding included). A page gets the whole snapshot when it connects, then
only the changes: a thousand nodes of which a few booted cost a few rows on the wire and in
the browser. A page that falls ``BACKLOG`` changes behind gets a whole snapshot again. With
nobody listening it does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from configserver.cloud.model import MIB, Volume
from configserver.model import BootTemplate
from configserver.registry import Registry

log = logging.getLogger(__name__)

INTERVAL = 2.0  # seconds between two builds while a page listens
KEEPALIVE = 15.0  # seconds of silence before a comment line keeps proxies from closing
BACKLOG = 8  # patches a page may have waiting before it gets a whole snapshot instead
MAX_LISTENERS = 64

_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def snapshot(registry: Registry, now: float | None = None) -> dict[str, Any]:
    """The whole dashboard as JSON-ready data (reads the registry: off the loop).

    Only what the page draws, and times to the second, so that a picture that did not change
    as drawn encodes to the same text (and is not sent again)."""
    nodes, instances = registry.overview()
    roles = registry.list_roles()
    volumes = registry.volumes()
    xen_roles = {r.name for r in roles if r.template == BootTemplate.XEN}
    placed: dict[str, list[dict[str, Any]]] = {}
    for guest in instances:
        if guest["node"]:
            placed.setdefault(guest["node"], []).append(guest)
    dom0s = [{
        "mac": n["mac"], "hostname": n["hostname"], "state": n["state"],
        "drained": bool(n["drained"]),
        "total_memory": _mib(n["total_memory_mib"]), "free_memory": _mib(n["free_memory_mib"]),
        "guest_memory": sum(g["memory"] for g in placed.get(n["mac"], [])),
        "instances": sorted(g["name"] for g in placed.get(n["mac"], []))}
        for n in nodes if n["role"] in xen_roles]
    by_mac = {n["mac"]: n for n in nodes}
    return {
        "time": round(time.time() if now is None else now),
        "roles": sorted(r.name for r in roles),
        "nodes": [{"mac": n["mac"], "role": n["role"], "hostname": n["hostname"],
                   "ip": n["ip"], "state": n["state"], "last_seen": _second(n["last_seen"]),
                   "last_heartbeat": _second(n["last_heartbeat"]),
                   "drained": bool(n["drained"])} for n in nodes],
        "dom0s": dom0s,
        "instances": instances,
        "volumes": [_volume(v, by_mac) for v in volumes],
    }


def _second(stamp: float | None) -> int | None:
    return None if stamp is None else round(stamp)


def _volume(volume: Volume, nodes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def hostname(mac: str) -> str | None:
        node = nodes.get(mac)
        return node["hostname"] if node else None

    return {"name": volume.name, "size": volume.size, "tenant": volume.tenant,
            "state": str(volume.state), "redundancy": str(volume.redundancy),
            "error": volume.error,
            "legs": [{"node": g.node, "hostname": hostname(g.node), "state": g.state,
                      "leaving": bool(nodes.get(g.node, {}).get("drained"))}
                     for g in volume.legs],
            "attached": [{"node": a.node, "hostname": hostname(a.node), "state": a.state,
                          "sync": a.sync} for a in volume.attachments]}


def _mib(value: Any) -> int | None:
    return value * MIB if isinstance(value, int) and not isinstance(value, bool) else None


# Each list of a snapshot, and the field that names its items.
KEYS = {"nodes": "mac", "dom0s": "mac", "instances": "name", "volumes": "name"}


def changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """What turns snapshot ``old`` into ``new`` (pure): per list, the items to set (new or
    changed) and the names to drop, the roles if they changed, and the time; None when nothing
    but the time moved."""
    patch: dict[str, Any] = {}
    for part, key in KEYS.items():
        before = {item[key]: item for item in old[part]}
        after = {item[key]: item for item in new[part]}
        changed = [item for name, item in after.items() if before.get(name) != item]
        dropped = [name for name in before if name not in after]
        if changed or dropped:
            patch[part] = {"set": changed, "drop": dropped}
    if old["roles"] != new["roles"]:
        patch["roles"] = new["roles"]
    if not patch:
        return None
    patch["time"] = new["time"]
    return patch


class FeedFull(Exception):
    """More pages listen than ``MAX_LISTENERS``."""


class _Listener:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue(maxsize=BACKLOG)
        self.resync = True  # the next thing it gets is a whole snapshot


class DashboardFeed:
    """One builder for every open page: a ``snapshot`` event (the whole picture) when a page
    connects or fell behind, then ``patch`` events (``changes``), in order."""

    def __init__(self, build: Callable[[], dict[str, Any]], *, interval: float = INTERVAL,
                 max_listeners: int = MAX_LISTENERS) -> None:
        self._build = build
        self.interval = interval
        self.max_listeners = max_listeners
        self._listeners: set[_Listener] = set()
        self._state: dict[str, Any] | None = None
        self._version = 0
        self._full: tuple[int, str] | None = None  # the encoded snapshot of a version
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.builds = 0

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    async def stream(self, keepalive: float = KEEPALIVE
                     ) -> AsyncIterator[tuple[str, str] | None]:
        """``(event, data)`` pairs: a ``snapshot`` at once, then a ``patch`` for each change;
        None after ``keepalive`` seconds of silence. Raises FeedFull when too many pages
        listen."""
        if self._closed:
            return
        if len(self._listeners) >= self.max_listeners:
            raise FeedFull(f"{len(self._listeners)} dashboards are open already")
        listener = _Listener()
        self._listeners.add(listener)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="dashboard-feed")
        try:
            seen = 0
            while True:
                if listener.resync:
                    listener.resync = False
                    seen, text = await self._snapshot()
                    yield "snapshot", text
                    continue
                try:
                    async with asyncio.timeout(keepalive):
                        version, text = await listener.queue.get()
                except TimeoutError:
                    yield None
                    continue
                if version < 0:  # closed: the server shuts down
                    return
                if version > seen:  # older ones are in the snapshot it got
                    seen = version
                    yield "patch", text
        finally:
            self._listeners.discard(listener)

    async def close(self) -> None:
        """End every stream (each sees its end at once) and stop building."""
        self._closed = True
        for listener in self._listeners:
            while not listener.queue.empty():
                listener.queue.get_nowait()
            listener.resync = False
            listener.queue.put_nowait((-1, ""))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _snapshot(self) -> tuple[int, str]:
        """The newest snapshot, encoded (in a worker thread, once per version)."""
        await self._ready.wait()
        version, state = self._version, self._state
        if self._full is None or self._full[0] != version:
            self._full = (version, await asyncio.to_thread(_encode, state))
        return self._full

    def _step(self, previous: dict[str, Any] | None
              ) -> tuple[dict[str, Any], str | None]:
        """Build the next snapshot and encode its changes (in a worker thread)."""
        current = self._build()
        patch = changes(previous, current) if previous is not None else None
        return current, _encode(patch) if patch is not None else None

    async def _run(self) -> None:
        while self._listeners:
            try:
                current, patch = await asyncio.to_thread(self._step, self._state)
            except Exception:
                log.exception("the dashboard's snapshot failed; trying again")
                await asyncio.sleep(max(self.interval, 5.0))
                continue
            self.builds += 1
            if self._state is None or patch is not None:
                self._state = current
                self._version += 1
                self._ready.set()
            if patch is not None:
                for listener in self._listeners:
                    if listener.queue.full():  # fell behind: a whole snapshot instead
                        while not listener.queue.empty():
                            listener.queue.get_nowait()
                        listener.resync = True
                    listener.queue.put_nowait((self._version, patch))
            await asyncio.sleep(self.interval)
        # Nobody listens: the next page waits for a fresh build.
        self._state, self._full = None, None
        self._ready.clear()


__all__ = ["KEYS", "DashboardFeed", "FeedFull", "changes", "snapshot"]
