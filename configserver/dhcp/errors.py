"""The DHCP server's exceptions (part of the config server's one hierarchy)."""

from __future__ import annotations

from configserver.errors import NetbootError, StoreError


class DhcpError(NetbootError):
    """Base of the DHCP server's errors."""

    code = "dhcp_error"


class MalformedPacket(DhcpError):
    """A datagram that is not a sane DHCP message; it is dropped, never answered."""

    status = 400
    code = "dhcp_malformed"


class LeaseStoreError(DhcpError, StoreError):
    """The lease database in the state directory cannot be used."""

    code = "dhcp_lease_store"


class DhcpSocketError(DhcpError):
    """A DHCP socket cannot be opened (port in use, no such interface, not root)."""

    code = "dhcp_socket"
