"""``farm dashboard``: the farm's config server dashboard in a browser on this host.

The farm's server listens inside the farm's namespace only. This forwards
``https://127.0.0.1:PORT`` (the host's loopback, nothing else) to the server's HTTPS port
there: each connection accepted on the host gets a socket made inside the namespace (a
short-lived thread enters it with ``setns``), and the bytes are copied both ways, untouched
(TLS runs end to end). It prints a single-use login link for that address. The server's
certificate names 127.0.0.1 and localhost; the browser trusts it once the farm's CA
(``state/pki/ca.pem``) is imported, or after its warning. Ctrl-C stops the forwarding; the farm
runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import socket
import sys
import threading
import urllib.parse

from configserver.farm import FarmError
from configserver.farm.farm import Farm, FarmState
from configserver.farm.network import NetworkPlan

SERVER_HTTPS_PORT = 8443
CLONE_NEWNET = 0x40000000
CHUNK = 65536


def login_link(farm: Farm, port: int) -> str:
    """A login link of the farm's server, for its forwarded address on this host."""
    url = urllib.parse.urlsplit(json.loads(farm.cli("dashboard", "login", "--json"))["url"])
    return urllib.parse.urlunsplit(url._replace(netloc=f"127.0.0.1:{port}"))


def socket_in(namespace: str) -> socket.socket:
    """A TCP socket of network namespace ``namespace`` (made by a thread that entered it)."""
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {namespace}")
            finally:
                os.close(fd)
            made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the caller
            made.append(exc)

    thread = threading.Thread(target=make, name="farm-netns-socket")
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def _forward(namespace: str, address: str, port: int, ready: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = await asyncio.to_thread(socket_in, namespace)
        upstream.setblocking(False)
        try:
            await loop.sock_connect(upstream, (address, SERVER_HTTPS_PORT))
        except OSError:
            upstream.close()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))

    try:
        server = await asyncio.start_server(connection, "127.0.0.1", port)
    except OSError as exc:
        raise FarmError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}",
                        hint="try another --port") from None
    ready.set()
    async with server:
        await server.serve_forever()


def serve(farm: Farm, port: int) -> int:
    state = FarmState.load(farm.dir)
    if state is None:
        raise FarmError(f"no farm is up in {farm.dir}", hint="start one with 'up'")
    address = NetworkPlan(state.namespace, state.subnet).server_ip
    link = login_link(farm, port)

    async def run() -> None:
        ready = asyncio.Event()
        forwarding = asyncio.create_task(_forward(state.namespace, address, port, ready))
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait({forwarding, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if forwarding.done():
            waiting.cancel()
            forwarding.result()  # its error
        print(f"the farm's dashboard: https://127.0.0.1:{port}/ (trust "
              f"{farm.state_dir / 'pki' / 'ca.pem'}, or accept the browser's warning)\n"
              f"sign in within two minutes, once: {link}\n"
              "(Ctrl-C stops the forwarding; the farm runs on)", flush=True)
        await forwarding

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0
