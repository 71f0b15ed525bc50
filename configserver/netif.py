"""The serving interface's IPv4 address (stdlib ioctls, Linux), and socket buffer sizing."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import socket
import struct

from configserver.errors import ConfigError

_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B


def interface_ipv4(name: str) -> ipaddress.IPv4Interface:
    """The primary IPv4 address and prefix of interface ``name``."""
    if not name or len(name) > 15 or "/" in name:
        raise ConfigError(f"invalid interface name {name!r}")
    packed = struct.pack("256s", name.encode())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            addr = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, packed)[20:24]
            mask = fcntl.ioctl(sock.fileno(), _SIOCGIFNETMASK, packed)[20:24]
        except OSError as exc:
            if exc.errno == 19:  # ENODEV
                raise ConfigError(f"no interface {name!r}",
                                  hint="see 'ip link' for the names here") from None
            raise ConfigError(f"interface {name!r} has no IPv4 address",
                              hint=f"add one, e.g. 'ip addr add 198.18.0.1/24 dev {name}'"
                              ) from None
    return ipaddress.IPv4Interface(f"{socket.inet_ntoa(addr)}/{socket.inet_ntoa(mask)}")


def grow_buffer(sock: socket.socket, option: int, size: int) -> None:
    """Ask for a ``size``-byte SO_RCVBUF or SO_SNDBUF (``option``), past net.core.*mem_max
    with SO_*BUFFORCE when we may (root), else as much as the system allows."""
    forced = (getattr(socket, "SO_RCVBUFFORCE", 33) if option == socket.SO_RCVBUF
              else getattr(socket, "SO_SNDBUFFORCE", 32))
    try:
        sock.setsockopt(socket.SOL_SOCKET, forced, size)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, size)
