"""The subnets the DHCP server serves (``SubnetPlan``) and its short negative memory.

A plan holds a subnet's pre-encoded options, a cursor into its pool and who of the unregistered
clients hold its addresses; ``RecentlyUnknown`` remembers negative registry answers briefly.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from configserver.config import Subnet
from configserver.dhcp import codec
from configserver.dhcp.guard import UnknownHolders
from configserver.dhcp.options import ip_list


@dataclass
class SubnetPlan:
    """A subnet we serve, with its options pre-encoded and a cursor into its pool."""

    subnet: Subnet
    network: ipaddress.IPv4Network
    lease_time: int
    options: dict[int, bytes]
    pool_start: int = 0
    pool_end: int = -1
    cursor: int = 0
    excluded: frozenset[str] = field(default_factory=frozenset)
    exhausted_at: float = float("-inf")
    exhausted_logged_at: float = float("-inf")
    unknown: UnknownHolders = field(default_factory=lambda: UnknownHolders(None))

    @classmethod
    def build(cls, subnet: Subnet, default_lease: int, server_address: str,
              unknown_share: float = 1.0) -> SubnetPlan:
        net = ipaddress.IPv4Network(subnet.network, strict=False)
        lease_time = subnet.lease_time or default_lease
        options = {codec.OPT_SUBNET_MASK: net.netmask.packed,
                   codec.OPT_BROADCAST: net.broadcast_address.packed}
        if subnet.router:
            options[codec.OPT_ROUTER] = ip_list([subnet.router])
        if subnet.dns:
            options[codec.OPT_DNS] = ip_list(subnet.dns)
        if subnet.domain:
            options[codec.OPT_DOMAIN] = subnet.domain.encode()
        if subnet.mtu:
            options[codec.OPT_MTU] = subnet.mtu.to_bytes(2, "big")
        plan = cls(subnet, net, lease_time, options,
                   excluded=frozenset({server_address, subnet.router or ""}))
        if subnet.pool:
            plan.pool_start = int(ipaddress.IPv4Address(subnet.pool[0]))
            plan.pool_end = int(ipaddress.IPv4Address(subnet.pool[1]))
            plan.cursor = plan.pool_start
        size = max(0, plan.pool_end - plan.pool_start + 1)
        # A share of 1 (the whole pool) sets no limit: the pool's exhaustion is the limit.
        plan.unknown = UnknownHolders(None if unknown_share >= 1 else
                                      max(1, math.floor(size * unknown_share)))
        return plan

    def in_pool(self, ip: str) -> bool:
        try:
            return self.pool_start <= codec.ip_to_int(ip) <= self.pool_end
        except ValueError:
            return False

    def contains(self, ip: str) -> bool:
        """Whether ``ip`` is a host address of this subnet."""
        try:
            value = codec.ip_to_int(ip)
        except ValueError:
            return False
        first = int(self.network.network_address)
        last = int(self.network.broadcast_address)
        return first < value < last


class RecentlyUnknown:
    """Registry answers "no such MAC" / "address not reserved", remembered for ``ttl`` seconds.

    Under load (an OS client's DISCOVER and REQUEST, or perfdhcp) the same negative registry
    lookup repeats within milliseconds; remembering it briefly halves the registry queries. A
    node or reservation added meanwhile takes effect at most ``ttl`` seconds later (a client
    given a pool address instead is NAKed at its REQUEST or renewal and starts again).
    """

    def __init__(self, ttl: float = 2.0, limit: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.limit = limit
        self._clock = clock
        self._until: dict[str, float] = {}

    def __contains__(self, key: str) -> bool:
        until = self._until.get(key)
        return until is not None and until > self._clock()

    def add(self, key: str) -> None:
        if len(self._until) >= self.limit:
            self._until.clear()
        self._until[key] = self._clock() + self.ttl

    def forget(self, key: str) -> None:
        self._until.pop(key, None)
