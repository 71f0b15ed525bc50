"""A watch on xenstore's ``@introduceDomain``: the dom0 agent hears of every new domain at
once (one made by hand without the claim is destroyed by the next pass, not the next resync).

The wire protocol is xenstored's own (``xen/include/public/io/xs_wire.h``): a message is four
little-endian 32-bit words (type, request id, transaction id, payload length) and a payload;
``XS_WATCH`` takes ``path\\0token\\0`` and xenstored answers ``OK`` and then sends
``XS_WATCH_EVENT`` messages with the same two strings, a first one right away. ``encode`` and
``decode`` are pure; ``DomainWatch`` only moves bytes over xenstored's unix socket (root only)
and counts the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SOCKET = Path("/run/xenstored/socket")
HEADER = struct.Struct("<IIII")
XS_WATCH = 4
XS_WATCH_EVENT = 15
XS_ERROR = 16
MAX_PAYLOAD = 4096  # XENSTORE_PAYLOAD_MAX
INTRODUCE = "@introduceDomain"
RETRY = 5.0


class XenstoreError(Exception):
    pass


@dataclass(frozen=True)
class Message:
    type: int
    req_id: int
    tx_id: int
    payload: bytes

    @property
    def strings(self) -> list[str]:
        """The payload's NUL-terminated strings."""
        return [part.decode(errors="replace") for part in self.payload.split(b"\0")[:-1]]


def encode(kind: int, *strings: str, req_id: int = 0) -> bytes:
    payload = b"".join(s.encode() + b"\0" for s in strings)
    if len(payload) > MAX_PAYLOAD:
        raise XenstoreError(f"a xenstore payload is at most {MAX_PAYLOAD} bytes")
    return HEADER.pack(kind, req_id, 0, len(payload)) + payload


def decode_header(data: bytes) -> tuple[int, int, int, int]:
    kind, req_id, tx_id, length = HEADER.unpack(data)
    if length > MAX_PAYLOAD:
        raise XenstoreError(f"xenstored sent a payload of {length} bytes")
    return kind, req_id, tx_id, length


async def read_message(reader: asyncio.StreamReader) -> Message:
    kind, req_id, tx_id, length = decode_header(await reader.readexactly(HEADER.size))
    return Message(kind, req_id, tx_id, await reader.readexactly(length))


class DomainWatch:
    """Counts xenstore's ``@introduceDomain`` events while it runs (``events``). Without
    xenstored (not a dom0, or not yet) it tries again now and then."""

    def __init__(self, socket: Path = SOCKET, retry: float = RETRY) -> None:
        self.events = 0
        self._socket = socket
        self._retry = retry
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                 name="xenstore-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        said = False
        while True:
            try:
                await self._watch()
            except (OSError, asyncio.IncompleteReadError, XenstoreError) as exc:
                if not said:
                    log.info("xenstore watch on %s: %s; trying again every %.0fs",
                             self._socket, exc or type(exc).__name__, self._retry)
                    said = True
            await asyncio.sleep(self._retry)

    async def _watch(self) -> None:
        reader, writer = await asyncio.open_unix_connection(str(self._socket))
        try:
            writer.write(encode(XS_WATCH, INTRODUCE, "netboot", req_id=1))
            await writer.drain()
            while True:
                message = await read_message(reader)
                if message.type == XS_ERROR:
                    raise XenstoreError(f"xenstored refused the watch: {message.strings}")
                if message.type == XS_WATCH_EVENT:
                    self.events += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


__all__ = ["DomainWatch", "Message", "XenstoreError", "decode_header", "encode",
           "read_message"]
