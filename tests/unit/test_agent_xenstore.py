"""The dom0 agent's xenstore watch: the wire format of xs_wire.h, and the watch against a
xenstored stand-in on a unix socket (its answers as xenstored gives them)."""

from __future__ import annotations

import asyncio
import struct

import pytest

from nodeagent.roles.xenstore import (
    XS_ERROR,
    XS_WATCH,
    XS_WATCH_EVENT,
    DomainWatch,
    XenstoreError,
    decode_header,
    encode,
)


def test_a_watch_request_is_four_words_and_nul_terminated_strings():
    data = encode(XS_WATCH, "@introduceDomain", "netboot", req_id=1)
    assert data[:16] == struct.pack("<IIII", 4, 1, 0, 25)
    assert data[16:] == b"@introduceDomain\0netboot\0"
    assert decode_header(data[:16]) == (4, 1, 0, 25)
    with pytest.raises(XenstoreError):
        decode_header(struct.pack("<IIII", XS_WATCH_EVENT, 0, 0, 1 << 20))
    with pytest.raises(XenstoreError):
        encode(XS_WATCH, "x" * 5000)


async def _xenstored(path, script):
    """A xenstored that reads one request, then sends ``script``'s messages."""
    requests = []

    async def client(reader, writer):
        header = await reader.readexactly(16)
        kind, req_id, _, length = struct.unpack("<IIII", header)
        requests.append((kind, await reader.readexactly(length)))
        for kind, payload in script:
            writer.write(struct.pack("<IIII", kind, req_id, 0, len(payload)) + payload)
        await writer.drain()
        await asyncio.sleep(30)

    server = await asyncio.start_unix_server(client, path=str(path))
    return server, requests


async def test_every_introduced_domain_counts(tmp_path):
    event = b"@introduceDomain\0netboot\0"
    server, requests = await _xenstored(tmp_path / "socket", [
        (XS_WATCH, b"OK\0"), (XS_WATCH_EVENT, event), (XS_WATCH_EVENT, event),
        (XS_WATCH_EVENT, event)])
    watch = DomainWatch(tmp_path / "socket", retry=0.05)
    watch.start()
    try:
        async with asyncio.timeout(5):
            while watch.events < 3:
                await asyncio.sleep(0.01)
        assert requests == [(XS_WATCH, b"@introduceDomain\0netboot\0")]
    finally:
        await watch.stop()
        server.close()


async def test_without_xenstored_or_refused_it_tries_again(tmp_path):
    watch = DomainWatch(tmp_path / "none", retry=0.05)
    watch.start()
    await asyncio.sleep(0.2)  # no socket: nothing counted, nothing raised
    assert watch.events == 0
    server, requests = await _xenstored(tmp_path / "none", [(XS_ERROR, b"EACCES\0")])
    try:
        async with asyncio.timeout(5):
            while len(requests) < 2:  # refused, then asked again
                await asyncio.sleep(0.01)
        assert watch.events == 0
    finally:
        await watch.stop()
        server.close()
