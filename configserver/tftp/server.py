"""UDP plumbing for TFTP: the request listener and one socket per transfer. Moves bytes only.

Both use non-blocking sockets driven by ``loop.add_reader``. The listener drains what is queued
per wake-up (a rack powering on sends requests in bursts); a transfer socket reads one datagram
per wake-up, since its client sends one ACK per window, which keeps the hot path (ACK in, DATA
out) to one ``recvfrom`` and one ``sendto`` per block. When an
interface is given, every socket is bound to it with SO_BINDTODEVICE, so nothing is ever sent
or received on another interface. The listener asks for IP_PKTINFO so a transfer can answer
from the very address the request was sent to, even when the listener is bound to 0.0.0.0.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Iterable

from configserver.netif import grow_buffer
from configserver.tftp.codec import MAX_DATAGRAM

log = logging.getLogger(__name__)

Address = tuple[str, int]
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO = struct.Struct("=i4s4s")
# Requests handled per wake-up before yielding to other sockets.
_DRAIN_LIMIT = 64
_SEND_BUFFER = 4 * 1024 * 1024
_LISTEN_BUFFER = 4 * 1024 * 1024
# Clients send only ACK and ERROR to a transfer socket; longer datagrams are cut, harmlessly.
_CLIENT_DATAGRAM = 1024


def open_udp_socket(address: str, port: int, interface: str | None, *,
                    pktinfo: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to ``address:port`` (and ``interface`` if given).

    Only a fixed port gets SO_REUSEADDR: with it, binding port 0 may hand two transfer sockets
    the same ephemeral port, and their clients' ACKs would cross.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if interface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                            interface.encode() + b"\0")
        if pktinfo:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        if port:
            # A rack powering on sends hundreds of requests at once; keep them all queued.
            grow_buffer(sock, socket.SO_RCVBUF, _LISTEN_BUFFER)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock


def open_connected_pair(local_address: str, interface: str | None,
                        client: Address) -> tuple[socket.socket, socket.socket]:
    """Two UDP sockets on one new port: one connected to ``client``, one for everyone else.

    The kernel hands the client's datagrams to the connected socket (a connected socket
    matches its peer better) and everything else to the unconnected one, so a lock-step
    transfer moves its blocks with ``send`` and ``recv`` (no address to parse or to build,
    a cached route) while a packet from an unknown TID can still be answered with ERROR 5.
    The first socket binds port 0 without SO_REUSEADDR, so the port is one nobody else has;
    SO_REUSEADDR, set on both afterwards, lets the second share it, and no later socket of
    ours binding port 0 can (they do not set it). Returns (connected, unconnected).
    """
    others = open_udp_socket(local_address, 0, interface)
    try:
        others.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if interface:
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                                interface.encode() + b"\0")
            peer.bind(others.getsockname())
            peer.connect(client)
        except OSError:
            peer.close()
            raise
    except OSError:
        others.close()
        raise
    return peer, others


class RequestListener:
    """The well-known port: hands each datagram, its sender and our address to ``on_request``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 on_request: Callable[[bytes, Address, str], None]) -> None:
        self._loop = loop
        self._sock = sock
        self._on_request = on_request
        self._fallback_address = sock.getsockname()[0]
        loop.add_reader(sock.fileno(), self._readable)

    @property
    def address(self) -> Address:
        return self._sock.getsockname()

    def send(self, datagram: bytes, address: Address) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendto(datagram, address)

    def _readable(self) -> None:
        for _ in range(_DRAIN_LIMIT):
            try:
                data, ancillary, _flags, sender = self._sock.recvmsg(MAX_DATAGRAM, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("TFTP listener receive failed: %s", exc)
                return
            local = self._fallback_address
            for level, kind, payload in ancillary:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(payload) >= 12:
                    # ipi_spec_dst: our address to answer from (ipi_addr could be broadcast)
                    local = socket.inet_ntoa(_PKTINFO.unpack_from(payload)[1])
            try:
                self._on_request(data, sender, local)
            except Exception:  # a bug in one request must not kill the listener
                log.exception("TFTP request from %s:%d failed", *sender)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


class TransferEndpoint:
    """The ephemeral socket (the server's TID) of one transfer.

    ``on_datagram(data, sender)`` receives everything that arrives, whoever sent it; checking
    the sender's TID is the caller's business. ``send`` queues what the socket cannot take yet.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 on_datagram: Callable[[bytes, Address], None]) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._on_datagram = on_datagram
        self._backlog: collections.deque[tuple[bytes, Address]] = collections.deque()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        loop.add_reader(self._fd, self._readable)

    @classmethod
    def open(cls, loop: asyncio.AbstractEventLoop, local_address: str, interface: str | None,
             on_datagram: Callable[[bytes, Address], None]) -> TransferEndpoint:
        return cls(loop, open_udp_socket(local_address, 0, interface), on_datagram)

    def send(self, datagrams: Iterable[bytes], address: Address) -> None:
        if self._backlog:
            self._backlog.extend((d, address) for d in datagrams)
            return
        sendto = self._sock.sendto
        pending = iter(datagrams)
        for datagram in pending:
            try:
                sendto(datagram, address)
            except (BlockingIOError, InterruptedError):
                self._backlog.append((datagram, address))
                self._backlog.extend((d, address) for d in pending)
                self._loop.add_writer(self._fd, self._writable)
                return
            except OSError as exc:
                # e.g. ENOBUFS or an ICMP error reported late: treat like a lost packet.
                log.debug("TFTP send to %s:%d failed: %s", *address, exc)
                return

    def _writable(self) -> None:
        while self._backlog:
            datagram, address = self._backlog[0]
            try:
                self._sock.sendto(datagram, address)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                pass
            self._backlog.popleft()
        self._loop.remove_writer(self._fd)

    def _readable(self) -> None:
        # One datagram per wake-up: a client sends one ACK per window, so trying for a second
        # would nearly always cost a failing recvfrom; epoll reports whatever else is queued.
        try:
            data, sender = self._sock.recvfrom(_CLIENT_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # ICMP port unreachable from a client that went away surfaces here.
            log.debug("TFTP transfer socket receive failed: %s", exc)
            return
        self._on_datagram(data, sender)

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._fd)
        if self._backlog:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(self._fd)
            self._backlog.clear()
        self._sock.close()
