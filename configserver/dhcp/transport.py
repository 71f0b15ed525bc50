"""UDP sockets for the DHCP server: they only move bytes.

Each socket is bound to one interface (SO_BINDTODEVICE), may broadcast, and hands every datagram
with its source address to a callback; sending goes straight to ``sendto``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from configserver.dhcp.codec import MAX_DATAGRAM
from configserver.dhcp.errors import DhcpSocketError
from configserver.netif import grow_buffer
from configserver.ratelog import worth_logging

log = logging.getLogger(__name__)

Address = tuple[str, int]
DatagramHandler = Callable[[bytes, Address], None]
READ_BATCH = 64
# Large socket buffers ride out scheduling stalls under load (bursts of DISCOVERs).
SOCKET_BUFFER = 8 << 20


class DhcpEndpoint:
    """One UDP socket on the event loop: drains every queued datagram per wake-up.

    Reading in a loop (rather than one datagram per event-loop iteration, as asyncio's
    datagram transport does) keeps the per-packet overhead low under load. Sends are
    non-blocking; a datagram that does not fit the socket buffer is dropped (DHCP retries).
    """

    def __init__(self, name: str, sock: socket.socket, handler: DatagramHandler) -> None:
        self.name = name
        self.sock = sock
        self.handler = handler
        self.send_errors = 0
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(READ_BATCH):
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # ICMP errors for earlier sends (a relay that went away): not fatal.
                log.debug("DHCP socket %s: %s", self.name, exc)
                return
            self.handler(data, addr)

    def send(self, data: bytes, addr: Address) -> None:
        if self.sock.fileno() < 0:
            return
        try:
            self.sock.sendto(data, addr)
        except OSError as exc:
            self.send_errors += 1
            if worth_logging(self.send_errors):
                log.warning("DHCP socket %s: send to %s:%d failed (%d so far): %s",
                            self.name, addr[0], addr[1], self.send_errors, exc)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()


def open_socket(interface: str | None, address: str, port: int) -> socket.socket:
    """A non-blocking UDP socket on ``address:port``, limited to ``interface`` if given."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        grow_buffer(sock, socket.SO_RCVBUF, SOCKET_BUFFER)
        grow_buffer(sock, socket.SO_SNDBUF, SOCKET_BUFFER)
        if interface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                            interface.encode() + b"\0")
        sock.bind((address, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = f" on {interface}" if interface else ""
        raise DhcpSocketError(f"cannot open DHCP socket {address}:{port}{where}: {exc}",
                              hint="DHCP needs root (or CAP_NET_RAW and CAP_NET_BIND_SERVICE)"
                                   " and a free port") from exc
    return sock


def listen(name: str, interface: str | None, address: str, port: int,
                 handler: DatagramHandler) -> DhcpEndpoint:
    sock = open_socket(interface, address, port)
    endpoint = DhcpEndpoint(name, sock, handler)
    log.info("DHCP listening on %s:%d%s (%s)", address, port,
             f" dev {interface}" if interface else "", name)
    return endpoint
