"""A dom0's share of live migrations (``configserver.cloud.migration``), in and out.

Each runs as a task of its own beside the passes (a migration takes a minute under TCG; a pass
must not wait for it); the passes start them from the work and report their states:

* target (``incoming`` in the work): a placeholder for the guest's disk (``blockmap``), then
  ``nodeagent.migratestream receive`` letting in only the source node, with ``xl
  migrate-receive -p`` behind it: ``listening`` (with its port), then ``received`` once the
  guest is here, paused (or ``failed`` if no domain arrived). Once the source released the
  array (it says so itself, ``notify_released``, or the work says so), this task assembles
  it, switches the placeholder over to it and unpauses the guest: ``running``.
* source (a guest entry with ``migrate``): ``xl migrate -p`` through ``migratestream
  connect``; the guest runs here until the target has it. Then its disk device goes and the
  array is stopped, before anything is reported: ``released``, told to the target's agent at
  once (``POST /v1/migrations/ID/released`` with this boot's certificate) and to the config
  server by the report. ``failed`` only while the guest still runs here (xl resumed it).

The direct word matters: the guest is paused from its last copy round until the target
unpauses it, and the report's way round (the source's pass, the server, the target's long
poll and pass) took 5 to 18 s in the farm against well under one for the direct one.

``sent`` (domains that left) and ``given_up`` (arrays stopped for a migration) keep the passes
from creating the guest or assembling its array again while the work still lists them. Both
``xl`` processes run in systemd scopes of their own: an agent restart does not cut a
migration short (its result is then not reported: the instance shows the migration stuck).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent import migratestream
from nodeagent.errors import MdError, RoleError, XenError
from nodeagent.roles import blockmap, md
from nodeagent.roles.xen import GUEST_SLICE

log = logging.getLogger(__name__)

RECEIVE_TIMEOUT = 300.0  # for the source's connection, once listening
MIGRATE_TIMEOUT = 1800.0
RELEASE_TRIES = 30
NOTIFY_TIMEOUT = 10.0
ARRAY_WAIT = 10.0  # for udev's /dev/md link of an array just assembled
INCOMING = "--incoming"  # xl's names for a domain in flight, on the target and on the source
MIGRATED_AWAY = "--migratedaway"


@dataclass(frozen=True)
class Credentials:
    """This boot's certificate and key and the config server's CA, as files (the helper
    process reads them)."""

    cert: Path
    key: Path
    ca: Path


Exists = Callable[[str], Awaitable[bool]]  # domain name -> is it here?
Unpause = Callable[[str], Awaitable[None]]
# A work entry -> its kernel and initramfs fetched to where the source has them: the guest's
# config names those paths, and xl makes the domain again from them when it reboots here.
Prepare = Callable[[Mapping[str, Any]], Awaitable[None]]
Assemble = Callable[[str], Awaitable[None]]  # an array's name -> it runs here (the dom0 role)


def md_name(entry: Mapping[str, Any]) -> str:
    return str(entry.get("device") or "").rsplit("/", 1)[-1]


def _scope(argv: list[str], what: str) -> list[str]:
    systemd_run = shutil.which("systemd-run")
    if systemd_run is None:
        return argv
    return [systemd_run, "--quiet", "--scope", "--collect", f"--slice={GUEST_SLICE}",
            f"--description={what}", *argv]


class Migrations:
    def __init__(self, credentials: Credentials | None, exists: Exists, unpause: Unpause, *,
                 python: str = sys.executable) -> None:
        self.credentials = credentials
        self.exists = exists
        self.unpause = unpause
        self.python = python
        self.assemble: Assemble | None = None  # set by the dom0 role
        self._released: dict[str, asyncio.Event] = {}
        self.states: dict[str, dict[str, Any]] = {}  # migration id -> its report line
        self.sent: set[str] = set()  # domains that left this dom0
        self.given_up: set[str] = set()  # arrays stopped here for a migration
        # Domains received for a migration that was then aborted: destroyed next pass.
        self.abandoned: set[str] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def fingerprint(self) -> object:
        return tuple(sorted((k, v["state"], v.get("error")) for k, v in self.states.items()))

    def arriving(self) -> set[str]:
        """Domains on their way here: never destroyed for want of a claim meanwhile, under
        either name (``xl migrate-receive`` builds ``NAME--incoming`` and renames it at the
        end)."""
        return {name for v in self.states.values() if v["side"] == "target"
                for name in (v["domain"], f"{v['domain']}{INCOMING}")}

    def leaving(self) -> set[str]:
        """Domains being sent away or gone: never created again (nor stopped) meanwhile, under
        either name (``xl migrate`` renames the source's ``NAME--migratedaway`` once the
        target has it). A pass between xl destroying the source's domain and the send's end
        must not see a guest to start."""
        going = {v["domain"] for v in self.states.values()
                 if v["side"] == "source" and v["state"] != "failed"} | self.sent
        return going | {f"{name}{MIGRATED_AWAY}" for name in going}

    def resuming(self) -> set[str]:
        """Arrays a target's task assembles itself (the source released them): the passes
        leave them be meanwhile."""
        return {v["md"] for k, v in self.states.items()
                if v["side"] == "target" and k in self._released
                and self._released[k].is_set() and v["state"] != "running"}

    def notify_released(self, key: str, peer: str | None) -> bool:
        """The source's own word that it stopped the array of migration ``key``: taken only
        from the source's identity, only for a migration coming here."""
        state = self.states.get(key)
        if state is None or state["side"] != "target" or not peer or state.get("peer") != peer:
            return False
        self._release_event(key).set()
        return True

    def _release_event(self, key: str) -> asyncio.Event:
        return self._released.setdefault(key, asyncio.Event())

    def report(self) -> list[dict[str, Any]]:
        """What the server hears: a source's ``sent`` (guest gone, array not yet released)
        is still ``sending``."""
        return [{"id": s["id"], "side": s["side"], "port": s["port"], "error": s["error"],
                 "state": "sending" if s["state"] == "sent" else s["state"]}
                for s in self.states.values()]

    def step(self, incoming: Sequence[Mapping[str, Any]],
             outgoing: Sequence[Mapping[str, Any]], prepare: Prepare) -> None:
        """Start what the work asks that is not under way, forget what it no longer lists."""
        listed: set[str] = set()
        for entry in incoming:
            moving, key, state = self._listed(entry, "migration", listed)
            if state is None:
                self._start(key, "target", entry, self._receive(key, entry, prepare))
                self.states[key]["peer"] = moving.get("peer")
            if moving.get("released"):  # the server heard it: in case the source's word
                self._release_event(key).set()  # did not come
        for entry in outgoing:
            moving, key, state = self._listed(entry, "migrate", listed)
            if state is None:
                self._start(key, "source", entry, self._send(key, entry, moving))
            elif state["state"] == "sent" and not self._busy(key):
                self._run(key, self._release(key, entry))
        for key in list(self.states):
            if key not in listed and not self._busy(key):
                state = self.states.pop(key)
                self._released.pop(key, None)
                self.sent.discard(state["domain"])
                self.given_up.discard(state["md"])
                if state["side"] == "target" and state["state"] != "running":
                    # Aborted here: what xl received (paused, never resumed under the
                    # claim) goes, even if this dom0 is given the instance's claim next.
                    self.abandoned.add(state["domain"])
            elif key not in listed and self.states[key]["side"] == "target":
                self._tasks[key].cancel()  # aborted: the receiver goes (its helper with it)

    def _listed(self, entry: Mapping[str, Any], field: str, listed: set[str]
                ) -> tuple[Mapping[str, Any], str, dict[str, Any] | None]:
        """A work entry's migration (under ``field``), its id (added to ``listed``) and what
        is under way for it here."""
        moving = entry.get(field) or {}
        key = str(moving.get("id"))
        listed.add(key)
        return moving, key, self.states.get(key)

    def _busy(self, key: str) -> bool:
        task = self._tasks.get(key)
        return task is not None and not task.done()

    def _start(self, key: str, side: str, entry: Mapping[str, Any],
               work: Awaitable[None]) -> None:
        self.states[key] = {"id": key, "side": side, "state": "preparing" if side == "target"
                            else "sending", "domain": str(entry.get("domain")),
                            "md": md_name(entry), "port": None, "error": None}
        self._run(key, work)

    def _run(self, key: str, work: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except (RoleError, OSError) as exc:
                message = getattr(exc, "message", None) or str(exc)
                self._failed(key, message)
                log.warning("migration %s: %s", key, message)
            except Exception as exc:  # a bug must still be reported, not left in a task
                self._failed(key, f"{type(exc).__name__}: {exc}")
                log.exception("migration %s failed", key)
        self._tasks[key] = asyncio.create_task(guarded(), name=f"migration-{key}")

    def _failed(self, key: str, message: str) -> None:
        """A task's error. A target that has not been given the array yet reports the
        migration failed (the server aborts it; the guest runs on at the source); past that
        point, and on the source, only the error is shown: the guest may be here already."""
        state = self.states[key]
        state["error"] = message
        released = self._released.get(key)
        if state["side"] == "target" and state["state"] in ("preparing", "listening") \
                and not (released is not None and released.is_set()):
            state["state"] = "failed"

    def _stream(self, peer: str) -> list[str]:
        if self.credentials is None:
            raise XenError("this agent has no certificate: it cannot migrate guests")
        return [self.python, "-m", "nodeagent.migratestream", "--cert",
                str(self.credentials.cert), "--key", str(self.credentials.key),
                "--ca", str(self.credentials.ca), "--peer", peer]

    async def _receive(self, key: str, entry: Mapping[str, Any], prepare: Prepare) -> None:
        state, moving = self.states[key], entry.get("migration") or {}
        name = md_name(entry)
        if not moving.get("peer") or not moving.get("size"):
            raise XenError("the work names no source identity or disk size")
        await prepare(entry)
        await blockmap.placeholder(name, int(moving["size"]))
        argv = [*self._stream(str(moving["peer"])), "receive", "--listen", "0.0.0.0:0",
                "--timeout", str(int(RECEIVE_TIMEOUT)), "--",
                *_scope(["xl", "migrate-receive", "-p"], f"xl receiving {state['domain']}")]
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        assert process.stdout is not None and process.stderr is not None
        try:
            first = (await process.stdout.readline()).decode(errors="replace").split()
            if first[:1] == ["listening"] and len(first) == 2 and first[1].isdigit():
                state.update(state="listening", port=int(first[1]))
                log.info("migration %s: receiving %s on port %s", key, state["domain"],
                         first[1])
            _, errors = await asyncio.wait_for(process.communicate(),
                                               RECEIVE_TIMEOUT + MIGRATE_TIMEOUT)
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if await self.exists(state["domain"]):
            state.update(state="received", error=None)
            log.info("migration %s: %s arrived, paused", key, state["domain"])
            await self._release_event(key).wait()
            await self._resume(key, entry)
            return
        said = errors.decode(errors="replace").strip().splitlines()
        log.warning("migration %s: nothing arrived (%s); the receiver said:\n%s", key,
                    process.returncode, "\n".join(said[-40:]))
        state.update(state="failed", error=_reason(said) or
                     f"the receiver ended ({process.returncode})")

    async def _resume(self, key: str, entry: Mapping[str, Any]) -> None:
        """The array assembled here (the source stopped it), the guest's disk switched over
        to it, the guest unpaused."""
        state, name = self.states[key], md_name(entry)
        loop = asyncio.get_running_loop()
        began = loop.time()
        if md.arrays().get(name) is None:
            if self.assemble is None:
                raise MdError(f"{name}: nothing here assembles arrays")
            try:
                await self.assemble(name)
            except MdError as exc:  # a pass may have assembled it meanwhile: waited for below
                log.info("migration %s: assembling %s: %s", key, name, exc.message)
        assembled = loop.time()
        deadline = assembled + ARRAY_WAIT
        while md.arrays().get(name) is None:
            if loop.time() > deadline:
                raise MdError(f"{name}: not up {ARRAY_WAIT:.0f}s after assembling it")
            await asyncio.sleep(0.05)
        found = loop.time()
        await blockmap.linear(name)
        switched = loop.time()
        await self.unpause(state["domain"])
        state.update(state="running", error=None)
        log.info("migration %s: %s runs here (array assembled in %.1fs, up in %.1fs more, "
                 "disk switched in %.1fs, unpaused in %.1fs)", key, state["domain"],
                 assembled - began, found - assembled, switched - found,
                 loop.time() - switched)

    async def _send(self, key: str, entry: Mapping[str, Any],
                    moving: Mapping[str, Any]) -> None:
        state, domain = self.states[key], str(entry.get("domain"))
        if not moving.get("peer") or not moving.get("address") or not moving.get("port"):
            raise XenError("the work names no target identity, address or port")
        connector = " ".join([*self._stream(str(moving["peer"])), "connect",
                              f"{moving['address']}:{int(moving['port'])}"]) + " #"
        argv = _scope(["xl", "migrate", "-p", "-s", connector, domain, str(moving["address"])],
                      f"xl sending {domain}")
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        try:
            timed = await asyncio.wait_for(_timed_lines(process), MIGRATE_TIMEOUT)
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        said = [line for _, line in timed]
        if process.returncode == 0:  # where the time went: the breakdown of docs/migration.md
            log.info("migration %s: xl migrate said:\n%s", key,
                     "\n".join(f"+{at:6.1f}s {line}" for at, line in timed[-12:]))
        if process.returncode != 0 and await self.exists(domain):
            log.warning("migration %s: xl migrate failed (%s):\n%s", key, process.returncode,
                        "\n".join(said[-40:]))
            state.update(state="failed", error=_reason(said) or
                         f"xl migrate failed ({process.returncode})")
            return
        self.sent.add(domain)
        self.given_up.add(state["md"])
        state.update(state="sent")
        log.info("migration %s: %s sent", key, domain)
        await self._release(key, entry)

    async def _release(self, key: str, entry: Mapping[str, Any]) -> None:
        """The disk device and the array of a guest that left, gone (retried: the back end
        lets go of the device a moment after the domain is destroyed)."""
        state, name = self.states[key], md_name(entry)
        for attempt in range(RELEASE_TRIES):
            try:
                await blockmap.remove(name)
                if md.arrays().get(name) is not None:
                    await md.stop(name)
                break
            except MdError as exc:
                if attempt == RELEASE_TRIES - 1:
                    raise
                state["error"] = f"releasing the array: {exc.message}"
                await asyncio.sleep(1.0)
        state.update(state="released", error=None)
        log.info("migration %s: array %s released", key, name)
        await self._notify(key, entry.get("migrate") or {})

    async def _notify(self, key: str, moving: Mapping[str, Any]) -> None:
        """Tell the target's agent the array is stopped (``migratestream``'s mutual TLS: this
        boot's certificate, the target's checked against the identity the work names). A
        failure only costs time: the target hears it from the config server too."""
        if (self.credentials is None or not moving.get("address") or not moving.get("peer")
                or not moving.get("api_port")):
            return
        _, context = migratestream.contexts(str(self.credentials.cert),
                                            str(self.credentials.key),
                                            str(self.credentials.ca))
        address, port = str(moving["address"]), int(moving["api_port"])
        path = f"/v1/migrations/{key}/released"
        url = f"https://{address}:{port}{path}"
        try:
            async with asyncio.timeout(NOTIFY_TIMEOUT):
                reader, writer = await asyncio.open_connection(address, port, ssl=context,
                                                               server_hostname="")
                try:
                    migratestream.check_peer(writer, str(moving["peer"]))
                    writer.write(f"POST {path} HTTP/1.1\r\nHost: {address}\r\n"
                                 "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
                    await writer.drain()
                    status = (await reader.readline()).decode(errors="replace").split()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
            if status[1:2] != ["200"]:
                raise XenError(f"{url} answered {' '.join(status[1:]) or 'nothing'}")
            log.info("migration %s: the target heard of the release", key)
        except (TimeoutError, OSError, XenError, migratestream.StreamError) as exc:
            log.warning("migration %s: could not tell the target itself (%s); it hears it "
                        "from the config server", key, exc)


async def _timed_lines(process: asyncio.subprocess.Process) -> list[tuple[float, str]]:
    """A process's output lines, each with the seconds since it started when it came."""
    assert process.stdout is not None
    loop = asyncio.get_running_loop()
    began, lines = loop.time(), []
    async for raw in process.stdout:
        line = raw.decode(errors="replace").rstrip()
        if line:
            lines.append((loop.time() - began, line))
    await process.wait()
    return lines


def _reason(lines: Sequence[str]) -> str | None:
    """The line of a tool's output that says why: its first error, else its last line."""
    errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    chosen = errors[0] if errors else (lines[-1] if lines else None)
    return chosen[:300] if chosen else None


__all__ = ["Credentials", "Migrations", "md_name"]
