"""A guest's console on a websocket: ``xl console`` in a pseudo-terminal, relayed both ways.

The config server opens ``/v1/console/<domain>`` on the dom0 that runs the guest (with its own
client certificate) and relays it to whoever ran ``configserver instance console``. Binary
frames carry the console's bytes, both ways; text frames carry JSON control messages, from the
agent only: first ``{"attached": {...}}`` or ``{"error": {...}}``, and ``{"detached": {...}}``
when the console ends on this side (the guest went away, ``xl console`` exited).

``xl console`` runs on the slave side of a pty of its own (xenconsole puts it in raw mode, so
bytes pass unchanged); the agent reads and writes the master side without blocking the event
loop. One console per domain: a second attach is refused unless it takes over (``force``),
which ends the first one's session.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from nodeagent.errors import AgentError
from nodeagent.roles import xen

log = logging.getLogger(__name__)

DOMAIN = re.compile(r"^nb-[a-z0-9][a-z0-9-]{0,39}$")  # only the control plane's guests
READ_CHUNK = 16384
STOP_GRACE = 2.0
WRITE_STALL = 10.0  # seconds the console may read no input before the session ends
TAKEOVER = 5.0  # seconds a taken-over session has to end
ESCAPE = 0x1D  # Ctrl-]: xenconsole's own escape, never passed on


class ConsoleRefused(Exception):
    """Why a console cannot be attached (sent to the client as an error frame)."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "hint": self.hint}


@dataclass
class ConsoleSession:
    domain: str
    who: str
    websocket: web.WebSocketResponse
    started: float = field(default_factory=time.time)
    relay: asyncio.Task[None] | None = None


class Pty:
    """``argv`` on a pty's slave side; ``read`` and ``write`` work on the master side."""

    def __init__(self, process: asyncio.subprocess.Process, master: int) -> None:
        self.process = process
        self._master = master
        self._readable = asyncio.Event()
        asyncio.get_running_loop().add_reader(master, self._readable.set)

    @classmethod
    async def spawn(cls, argv: Sequence[str]) -> Pty:
        master, slave = os.openpty()
        try:
            os.set_blocking(master, False)
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        return cls(process, master)

    async def read(self) -> bytes:
        """The next output (b"" once the program has gone and its output is read)."""
        while True:
            try:
                return os.read(self._master, READ_CHUNK)
            except BlockingIOError:
                self._readable.clear()
                await self._readable.wait()
            except OSError as exc:  # EIO: the slave side is closed, the program gone
                if exc.errno == errno.EIO:
                    return b""
                raise

    async def write(self, data: bytes) -> None:
        """All of ``data``, or OSError once the program has read nothing for WRITE_STALL."""
        view = memoryview(data)
        stalled = time.monotonic() + WRITE_STALL
        while view:
            try:
                view = view[os.write(self._master, view):]
                stalled = time.monotonic() + WRITE_STALL
            except BlockingIOError:  # the pty's buffer is full: the program reads slowly
                if time.monotonic() > stalled:
                    raise OSError(errno.ETIMEDOUT, "the console reads no input") from None
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self._master)
        try:
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.terminate()
                try:
                    await asyncio.wait_for(self.process.wait(), STOP_GRACE)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        self.process.kill()
                    await self.process.wait()
        finally:
            os.close(self._master)


def console_argv(domain: str) -> list[str]:
    return ["xl", "console", domain]


async def running_domains() -> list[str]:
    return [domain.name for domain in await xen.domains()]


class Consoles:
    """The consoles this agent relays now, at most one per domain."""

    def __init__(self, argv: Callable[[str], Sequence[str]] = console_argv,
                 running: Callable[[], Awaitable[Sequence[str]]] = running_domains) -> None:
        self._argv = argv
        self._running = running
        self._sessions: dict[str, ConsoleSession] = {}
        self._attaching = asyncio.Lock()  # one attach (check, take over, register) at a time

    def active(self) -> list[dict[str, object]]:
        return [{"domain": s.domain, "who": s.who, "since": s.started}
                for s in self._sessions.values()]

    async def serve(self, websocket: web.WebSocketResponse, domain: str, who: str, *,
                    force: bool) -> None:
        """Relay ``domain``'s console over an open websocket until either side ends."""
        async with self._attaching:
            try:
                try:
                    running = await self._running()
                except AgentError as exc:
                    raise ConsoleRefused("xen_unavailable", exc.message) from None
                self._check(domain, force, running)
            except ConsoleRefused as exc:
                with contextlib.suppress(ConnectionError):
                    await websocket.send_json({"error": exc.to_json()})
                await websocket.close()
                return
            previous = self._sessions.get(domain)
            if previous is not None:  # taken over: the earlier session ends first
                await self._end(previous, f"taken over by {who}")
            session = ConsoleSession(domain, who, websocket)
            session.relay = asyncio.create_task(self._relay(session))
            session.relay.add_done_callback(lambda _: self._forget(session))
            self._sessions[domain] = session
        try:
            await asyncio.shield(session.relay)
        except asyncio.CancelledError:  # this request's handler is cancelled: end the relay
            session.relay.cancel()
            raise

    def _forget(self, session: ConsoleSession) -> None:
        if self._sessions.get(session.domain) is session:
            del self._sessions[session.domain]

    async def _end(self, session: ConsoleSession, reason: str) -> None:
        """Say why and end ``session``'s relay (a stuck one is cancelled), within TAKEOVER."""
        with contextlib.suppress(ConnectionError):
            await session.websocket.send_json({"detached": {"reason": reason}})
        assert session.relay is not None
        session.relay.cancel()
        await asyncio.wait({session.relay}, timeout=TAKEOVER)
        self._forget(session)  # a relay stuck past TAKEOVER no longer holds the console

    def _check(self, domain: str, force: bool, running: Sequence[str]) -> None:
        if not DOMAIN.match(domain):
            raise ConsoleRefused("invalid_domain", f"{domain!r} is not a guest of the "
                                 "control plane", hint="domains are named nb-<instance>")
        if domain not in running:
            raise ConsoleRefused("not_running", f"{domain} does not run on this dom0")
        current = self._sessions.get(domain)
        if current is not None and not force:
            raise ConsoleRefused(
                "console_busy", f"the console of {domain} is attached by {current.who} "
                f"since {time.strftime('%H:%M:%S', time.gmtime(current.started))} UTC",
                hint="take it over with --force")

    async def _relay(self, session: ConsoleSession) -> None:
        websocket = session.websocket
        try:
            pty = await Pty.spawn(self._argv(session.domain))
        except OSError as exc:
            with contextlib.suppress(ConnectionError):
                await websocket.send_json({"error": ConsoleRefused(
                    "console_failed", f"cannot run xl console: {exc}").to_json()})
            await websocket.close()
            return
        log.info("console of %s attached by %s", session.domain, session.who)
        reason = "the client detached"
        try:
            await websocket.send_json({"attached": {"domain": session.domain}})
            output = asyncio.create_task(self._output(pty, websocket))
            typing = asyncio.create_task(self._input(pty, websocket))
            try:
                await asyncio.wait({output, typing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (output, typing):
                    task.cancel()
                for task in (output, typing):
                    with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                        reason = await task or reason
        except (ConnectionError, asyncio.CancelledError) as exc:
            reason = "taken over" if isinstance(exc, asyncio.CancelledError) else str(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            await pty.close()
            log.info("console of %s detached (%s)", session.domain, reason)
            await websocket.close()

    @staticmethod
    async def _input(pty: Pty, websocket: web.WebSocketResponse) -> str:
        async for message in websocket:
            if message.type == WSMsgType.BINARY:
                data = bytes(message.data).replace(bytes([ESCAPE]), b"")
                if data:
                    await pty.write(data)
            elif message.type == WSMsgType.ERROR:
                return f"websocket error: {websocket.exception()}"
        return "the client detached"

    @staticmethod
    async def _output(pty: Pty, websocket: web.WebSocketResponse) -> str:
        while True:
            data = await pty.read()
            if not data:
                status = await pty.process.wait()
                reason = f"xl console exited ({status})"
                with contextlib.suppress(ConnectionError):
                    await websocket.send_json({"detached": {"reason": reason}})
                    await websocket.close()
                return reason
            await websocket.send_bytes(data)
