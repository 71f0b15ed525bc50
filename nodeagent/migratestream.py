"""The live-migration stream between two dom0 agents: ``xl``'s migration protocol over mutual
TLS with the nodes' own boot certificates, never over ssh keys shared between dom0s.

``xl migrate -s CMD`` runs ``CMD HOST xl migrate-receive ...`` and speaks the protocol on
that command's stdin and stdout; the source agent passes ``CMD`` = ``python3 -m
nodeagent.migratestream connect ADDRESS:PORT --peer URN ... #`` (the ``#`` drops the rest of
the line: the target chose its own ``migrate-receive`` options). The target agent runs
``receive``: it listens on one port (``--listen ADDRESS:0``: any free one; it prints
``listening PORT`` once it does) for one connection whose certificate names the expected
source node in its current boot, then runs ``xl migrate-receive`` with its stdin and stdout on
that stream. Both sides verify the peer against the config server's CA and its identity
(``urn:netboot:node:<mac>:<boot>``); anything else is refused before a byte of the guest
passes.

A process of its own (not the agent's event loop): it moves the guest's whole memory.
ChaCha20-Poly1305 is offered first: machines without AES instructions (and the TCG farm)
encrypt it several times faster than AES-GCM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import sys
from collections.abc import Sequence

from nodeagent.peers import peer_identity

CHUNK = 256 * 1024
# TLS 1.2 suites by preference (TLS 1.3 picks ChaCha20 itself where AES is slow).
CIPHERS = "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256"
ACCEPT_TIMEOUT = 120.0


class StreamError(Exception):
    """The stream could not be set up: the message says why (a wrong peer, a timeout)."""


def contexts(cert: str, key: str, ca: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: this node's certificate, peers checked against ``ca``."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    for context in (server, client):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(CIPHERS)
        context.load_cert_chain(cert, key)
    server.verify_mode = ssl.CERT_REQUIRED
    client.check_hostname = False  # nodes are known by their identity, not a DNS name
    return server, client


def check_peer(writer: asyncio.StreamWriter, expected: str) -> None:
    ssl_object = writer.get_extra_info("ssl_object")
    found = peer_identity(ssl_object.getpeercert() if ssl_object is not None else None)
    if found != expected:
        raise StreamError(f"the peer is {found or 'unnamed'}, not {expected}")


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None,
               sink: object = None) -> int:
    """Copy ``reader`` to ``writer`` (or to the file object ``sink``) until EOF; bytes."""
    moved = 0
    while chunk := await reader.read(CHUNK):
        moved += len(chunk)
        if writer is not None:
            writer.write(chunk)
            await writer.drain()
        else:
            sink.write(chunk)  # type: ignore[attr-defined]
            sink.flush()  # type: ignore[attr-defined]
    if writer is not None and writer.can_write_eof():
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()
    return moved


async def _stdio() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=CHUNK * 4)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, sys.stdout)
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return reader, writer


async def connect(address: str, peer: str, context: ssl.SSLContext,
                  timeout: float = 30.0) -> int:
    """stdin and stdout on a TLS stream to the target (the source's side)."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, int(port), ssl=context, limit=CHUNK * 4), timeout)
    check_peer(writer, peer)
    into, out = await _stdio()
    await asyncio.gather(pump(into, writer), pump(reader, out))
    writer.close()
    return 0


async def receive(listen: str, peer: str, context: ssl.SSLContext, command: Sequence[str],
                  timeout: float = ACCEPT_TIMEOUT) -> int:
    """One verified connection on ``listen``, fed to ``command``; its exit status."""
    host, _, port = listen.rpartition(":")
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
        asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            check_peer(writer, peer)
        except StreamError as exc:
            print(f"migratestream: refused a connection: {exc}", file=sys.stderr)
            writer.close()
            return
        if accepted.done():
            writer.close()
            return
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(on_connect, host or None, int(port), ssl=context,
                                        limit=CHUNK * 4)
    port_now = server.sockets[0].getsockname()[1]
    # The agent waits for this line (with the port, if it asked for any: 0) before the
    # source may connect.
    print(f"listening {port_now}", flush=True)
    try:
        reader, writer = await asyncio.wait_for(accepted, timeout)
    except TimeoutError:
        raise StreamError(f"no connection from {peer} within {timeout:.0f} s") from None
    finally:
        server.close()
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None

    async def to_command() -> None:
        with contextlib.suppress(ConnectionError, BrokenPipeError):
            while chunk := await reader.read(CHUNK):
                process.stdin.write(chunk)  # type: ignore[union-attr]
                await process.stdin.drain()  # type: ignore[union-attr]
        with contextlib.suppress(OSError):
            process.stdin.close()  # type: ignore[union-attr]

    feeding = asyncio.create_task(to_command())
    with contextlib.suppress(ConnectionError):
        await pump(process.stdout, writer)
    status = await process.wait()
    feeding.cancel()
    writer.close()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m nodeagent.migratestream")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--peer", required=True, help="the other node's identity URN")
    sub = parser.add_subparsers(dest="side", required=True)
    out = sub.add_parser("connect")
    out.add_argument("address", help="ADDRESS:PORT of the target's receiver")
    out.add_argument("rest", nargs="*", help="ignored: what xl appends")
    into = sub.add_parser("receive")
    into.add_argument("--listen", required=True, help="ADDRESS:PORT")
    into.add_argument("--timeout", type=float, default=ACCEPT_TIMEOUT)
    into.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    try:
        server, client = contexts(args.cert, args.key, args.ca)
        if args.side == "connect":
            return asyncio.run(connect(args.address, args.peer, client))
        return asyncio.run(receive(args.listen, args.peer, server, args.command,
                                   args.timeout))
    except (StreamError, OSError, ssl.SSLError, TimeoutError) as exc:
        print(f"migratestream: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
