"""``configserver instance console NAME``: the guest's console, wherever it runs now.

A websocket to the config server (``/api/v1/instances/NAME/console``), which relays it to the
agent of the dom0 running the guest. On a terminal the keyboard goes to the guest raw (the
terminal is put back on exit); Ctrl-] detaches and leaves the guest running. Not on a
terminal (a script, a test) the input is passed on as it comes, Ctrl-] detaching too, and its
end detaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import termios
import tty
import urllib.parse
from dataclasses import dataclass
from typing import Any, BinaryIO, TextIO

import aiohttp

from configserver.errors import NetbootError, ServerUnavailable
from configserver.http.client import ApiClient, ApiError

ESCAPE = b"\x1d"  # Ctrl-]


@dataclass
class Terminal:
    """Where the keyboard is read (``fd``), the console shown, and our own lines said; a
    terminal goes raw once the console is there (``raw``) and back on exit (``restore``)."""

    fd: int
    stdout: BinaryIO
    stderr: TextIO
    saved: list[Any] | None = None  # the terminal's modes before raw

    @property
    def newline(self) -> str:
        return "\r\n" if self.saved is not None else "\n"

    def raw(self) -> None:
        if self.saved is None and os.isatty(self.fd):
            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)

    def restore(self) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            self.saved = None

    def say(self, text: str) -> None:
        self.stderr.write(f"{self.newline}[{text}]{self.newline}")
        self.stderr.flush()


def console_path(name: str, force: bool) -> str:
    return (f"/api/v1/instances/{urllib.parse.quote(name, safe='')}/console"
            + ("?force=1" if force else ""))


def split_escape(data: bytes) -> tuple[bytes, bool]:
    """What to send of a keyboard read, and whether it asked to detach (Ctrl-])."""
    before, found, _ = data.partition(ESCAPE)
    return before, bool(found)


def control_message(text: str) -> dict[str, Any]:
    """A text frame: ``{"attached"|"detached"|"error": {...}}``."""
    try:
        message = json.loads(text)
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def attach(client: ApiClient, name: str, *, force: bool = False,
           stdin: BinaryIO | None = None, stdout: BinaryIO | None = None,
           stderr: TextIO | None = None) -> int:
    """Relay until detached (0) or the console ended (0) or failed (raises)."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr
    terminal = Terminal(stdin.fileno(), stdout, stderr)
    try:
        return asyncio.run(_session(client, name, terminal, force=force))
    finally:
        terminal.restore()


async def _session(client: ApiClient, name: str, terminal: Terminal, *, force: bool) -> int:
    path = console_path(name, force)
    if client.unix_socket is not None:
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=str(client.unix_socket))
        url = "http://localhost" + path
    else:
        connector = aiohttp.TCPConnector(ssl=client.tls or True)
        url = client.base_url + path
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=client.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        try:
            async with asyncio.timeout(client.timeout):  # TCP, TLS and the upgrade
                websocket = await http.ws_connect(url, heartbeat=30.0,
                                                  max_msg_size=64 * 1024)
        except aiohttp.WSServerHandshakeError as exc:
            # Refused before the upgrade (unknown instance, not allowed): the same request
            # without it gets the API's JSON error.
            await asyncio.to_thread(client.get, path)
            raise ApiError(exc.status, "http_error", f"HTTP {exc.status} {exc.message}"
                           ) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ServerUnavailable(f"cannot reach the config server at "
                                    f"{client.unix_socket or client.base_url}: {exc}") from None
        async with websocket:
            return await _relay(websocket, name, terminal)


async def _relay(websocket: aiohttp.ClientWebSocketResponse, name: str,
                 terminal: Terminal) -> int:
    loop = asyncio.get_running_loop()
    fd, say = terminal.fd, terminal.say
    keyboard: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            keyboard.put_nowait(os.read(fd, 4096))
        except OSError:
            keyboard.put_nowait(b"")

    async def typing() -> str:
        while True:
            data = await keyboard.get()
            if not data:
                return "the input ended"
            data, detach = split_escape(data)
            if data:
                await websocket.send_bytes(data)
            if detach:
                return "detached"

    async def from_file() -> None:  # a regular file cannot be polled: read it in a thread
        while data := await asyncio.to_thread(os.read, fd, 4096):
            keyboard.put_nowait(data)
        keyboard.put_nowait(b"")

    attached = False
    reader: asyncio.Task[None] | None = None
    try:
        loop.add_reader(fd, readable)
    except PermissionError:
        reader = asyncio.create_task(from_file())
    keys = asyncio.create_task(typing())
    try:
        async for message in _until(websocket, keys):
            if message.type == aiohttp.WSMsgType.BINARY:
                terminal.stdout.write(message.data)
                terminal.stdout.flush()
                continue
            control = control_message(message.data)
            if "error" in control:
                error = control["error"] or {}
                raise ApiError(int(error.get("status", 502)), str(error.get("code", "error")),
                               str(error.get("message", "the console failed")),
                               str(error.get("hint", "")))
            if "attached" in control:
                attached = True
                terminal.raw()  # only now: until here Ctrl-C still ends the command
                say(f"console of {name}; Ctrl-] detaches")
            elif "detached" in control:
                say(f"console of {name} ended: {control['detached'].get('reason', '')}")
                return 0
        if keys.done() and not keys.cancelled():
            try:
                ended = keys.result()
            except ConnectionError:  # the server went while a key was on its way
                ended = ""
            if ended:
                say(f"{ended} from the console of {name}; it keeps running")
                return 0
        if not attached:
            raise ServerUnavailable(f"the console of {name} closed before it attached")
        say(f"the console of {name} closed")
        return 0
    finally:
        if reader is None:
            loop.remove_reader(fd)
        else:
            reader.cancel()
        keys.cancel()
        with contextlib.suppress(asyncio.CancelledError, NetbootError, ConnectionError):
            await keys


async def _until(websocket: aiohttp.ClientWebSocketResponse, keys: asyncio.Task[str]
                 ) -> Any:
    """The websocket's data frames until it closes or the keyboard task ends."""
    while True:
        receive = asyncio.ensure_future(websocket.receive())
        await asyncio.wait([receive, keys], return_when=asyncio.FIRST_COMPLETED)
        if not receive.done():
            receive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receive
            return
        message = receive.result()
        if message.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
            yield message
        else:
            return
