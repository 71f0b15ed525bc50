"""The serving interface's IPv4 address, read once at start (stdlib ioctls, Linux)."""

from __future__ import annotations

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
