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
    ended: asyncio.Event = field(default_factory=asyncio.Event)


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
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._master, view):]
            except BlockingIOError:  # the pty's buffer is full: the program reads slowly
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._master)
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), STOP_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
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

    def active(self) -> list[dict[str, object]]:
        return [{"domain": s.domain, "who": s.who, "since": s.started}
                for s in self._sessions.values()]

    async def serve(self, websocket: web.WebSocketResponse, domain: str, who: str, *,
                    force: bool) -> None:
        """Relay ``domain``'s console over an open websocket until either side ends."""
        try:
            try:
                running = await self._running()
            except AgentError as exc:
                raise ConsoleRefused("xen_unavailable", exc.message) from None
            self._check(domain, force, running)
        except ConsoleRefused as exc:
            await websocket.send_json({"error": exc.to_json()})
            await websocket.close()
            return
        previous = self._sessions.get(domain)
        if previous is not None:  # taken over: the earlier session ends first
            await previous.websocket.send_json(
                {"detached": {"reason": f"taken over by {who}"}})
            await previous.websocket.close()
            await previous.ended.wait()
        session = ConsoleSession(domain, who, websocket)
        self._sessions[domain] = session
        try:
            await self._relay(session)
        finally:
            if self._sessions.get(domain) is session:
                del self._sessions[domain]
            session.ended.set()

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
            await websocket.send_json({"error": ConsoleRefused(
                "console_failed", f"cannot run xl console: {exc}").to_json()})
            await websocket.close()
            return
        log.info("console of %s attached by %s", session.domain, session.who)
        reason = "the client detached"
        try:
            await websocket.send_json({"attached": {"domain": session.domain}})
            output = asyncio.create_task(self._output(pty, websocket))
            try:
                async for message in websocket:
                    if message.type == WSMsgType.BINARY:
                        data = bytes(message.data).replace(bytes([ESCAPE]), b"")
                        if data:
                            await pty.write(data)
                    elif message.type == WSMsgType.ERROR:
                        reason = f"websocket error: {websocket.exception()}"
                        break
                    if output.done():
                        break
            finally:
                output.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    ended = await output
                    if ended:
                        reason = ended
        finally:
            await pty.close()
            log.info("console of %s detached (%s)", session.domain, reason)
            await websocket.close()

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
