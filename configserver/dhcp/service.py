"""The DHCP service: sockets + codec + policy + lease store, and the hook ``start_dhcp``.

Each datagram is decoded, answered by the policy and sent where RFC 2131 section 4.1 says: to
the relay (giaddr), to the client's address (ciaddr), or broadcast. A malformed datagram or an
error while answering is logged (rate-limited) and dropped; the server keeps answering others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, OrderedDict

from configserver.config import DhcpMode, ServerConfig
from configserver.dhcp import codec
from configserver.dhcp.codec import DhcpPacket, MessageType
from configserver.dhcp.errors import LeaseStoreError, MalformedPacket
from configserver.dhcp.leases import Lease, LeaseStore
from configserver.dhcp.policy import DHCP_PORT, PROXY_PORT, DhcpPolicy
from configserver.dhcp.transport import Address, DatagramHandler, DhcpEndpoint, listen
from configserver.ratelog import RateLimitedLog
from configserver.registry import Registry

log = logging.getLogger(__name__)

BROADCAST = "255.255.255.255"
SIGHTINGS_KEPT = 4096
PURGE_TIMEOUT = 30.0


def destination(request: DhcpPacket, reply: DhcpPacket, source: Address, port: str, *,
                client_port: int, relay_port: int) -> Address:
    """Where an answer goes (RFC 2131 4.1; the ProxyDHCP port answers its sender)."""
    if port == PROXY_PORT:
        return source
    if request.giaddr != "0.0.0.0":
        return request.giaddr, source[1] if source[0] == request.giaddr else relay_port
    if reply.message_type == MessageType.NAK:
        return BROADCAST, client_port
    if request.ciaddr != "0.0.0.0":
        return request.ciaddr, client_port
    # A client without an address cannot receive unicast before we add an ARP entry for it;
    # broadcasting is what RFC 2131 allows when the server cannot do that.
    return BROADCAST, client_port


class DhcpService:
    """A running DHCP server (or, in mode ``off``, just the lease lookup for TFTP)."""

    def __init__(self, config: ServerConfig, registry: Registry, leases: LeaseStore,
                 policy: DhcpPolicy) -> None:
        self.config = config
        self.registry = registry
        self.leases = leases
        self.policy = policy
        self.sockets: list[DhcpEndpoint] = []
        self.bad_input = RateLimitedLog(log)
        self.dropped = 0  # malformed datagrams
        self.failed = 0  # requests whose answer raised (registry down, a bug)
        self.answered = 0
        self.unlisted_relay = 0  # relayed datagrams from a source not in ``dhcp.relays``
        self.pending_expired = 0
        # Decoded requests by (message type, answer type or "none"), and every datagram not
        # answered by why: what /metrics shows (configserver.telemetry.collectors).
        self.packets: Counter[tuple[str, str]] = Counter()
        self.drops: Counter[str] = Counter()
        self._relays = frozenset(config.dhcp.relays)
        self._expiry_task: asyncio.Task[None] | None = None
        self._sightings: OrderedDict[str, str] = OrderedDict()
        self._endpoints: dict[str, DhcpEndpoint] = {}

    async def open(self) -> None:
        dhcp = self.config.dhcp
        if dhcp.mode == DhcpMode.OFF:
            return
        interface = self.config.interface
        try:
            for port, kind in ((dhcp.port, DHCP_PORT), (dhcp.proxy_port, PROXY_PORT)):
                endpoint = listen(kind, interface, dhcp.bind_address, port,
                                  self._handler(kind))
                self.sockets.append(endpoint)
                self._endpoints[kind] = endpoint
        except Exception:
            self._close_sockets()
            raise
        self._expiry_task = asyncio.get_running_loop().create_task(self._expire_pending())

    async def _expire_pending(self) -> None:
        """Remove pending (discovered) nodes not seen for ``dhcp.pending_expiry`` seconds."""
        expiry = self.config.dhcp.pending_expiry
        while True:
            try:
                removed = await asyncio.to_thread(self.registry.purge_pending, expiry)
            except Exception as exc:
                log.warning("expiring pending nodes failed: %s", exc)
            else:
                self.pending_expired += len(removed)
                if removed:
                    log.info("%d pending nodes not seen for %d s removed", len(removed), expiry)
            await asyncio.sleep(min(60.0, expiry / 4))

    def _handler(self, kind: str) -> DatagramHandler:
        def handle(data: bytes, source: Address) -> None:
            self.handle_datagram(data, source, kind, self._endpoints.get(kind))
        return handle

    def handle_datagram(self, data: bytes, source: Address, kind: str,
                        endpoint: DhcpEndpoint | None) -> bytes | None:
        """Answer one datagram; returns the bytes sent (or queued until the lease commits)."""
        try:
            request = codec.decode(data)
        except MalformedPacket as exc:
            self.dropped += 1
            self.drops["malformed"] += 1
            self.bad_input.warning("dropped malformed DHCP datagram from "
                                   "%s:%d: %s", source[0], source[1], exc.message)
            return None
        if request.giaddr != "0.0.0.0" and source[0] not in self._relays:
            # Anyone can set giaddr: only the relays we were told about may speak for a subnet.
            self.unlisted_relay += 1
            self.drops["unlisted_relay"] += 1
            self.bad_input.warning("%s: dropped relayed DHCP datagram (giaddr %s) from %s, "
                                   "which is not in dhcp.relays (%d so far)", request.mac,
                                   request.giaddr, source[0], self.unlisted_relay)
            return None
        asked = request.message_type.name.lower() if request.message_type else "bootp"
        try:
            reply = self.policy.answer(request, kind)
            if reply is None:
                self.packets[asked, "none"] += 1
                self.drops["ignored"] += 1
                return None
            wire = codec.encode(reply.packet, max_size=codec.max_reply_size(request))
            to = destination(request, reply.packet, source, kind,
                             client_port=self.config.dhcp.client_port, relay_port=67)
        except Exception as exc:
            self.failed += 1
            self.packets[asked, "none"] += 1
            self.drops["error"] += 1
            self.bad_input.warning("%s: DHCP request not answered"
                                   " (%s: %s)", request.mac, type(exc).__name__, exc)
            return None
        if request.ciaddr != "0.0.0.0":
            self._sighted(request.ciaddr, request.mac)
        self.answered += 1
        answer = reply.packet.message_type
        self.packets[asked, answer.name.lower() if answer else "bootp"] += 1
        if endpoint is not None:
            if reply.durable:
                self.leases.when_durable(lambda: endpoint.send(wire, to))
            else:
                endpoint.send(wire, to)
        return wire

    def _sighted(self, ip: str, mac: str) -> None:
        self._sightings[ip] = mac
        self._sightings.move_to_end(ip)
        if len(self._sightings) > SIGHTINGS_KEPT:
            self._sightings.popitem(last=False)

    def mac_for_ip(self, ip: str) -> str | None:
        """The MAC behind an address: our leases, addresses seen in requests, reservations."""
        mac = self.leases.holder(ip) or self._sightings.get(ip)
        if mac is not None:
            return mac
        try:
            node = self.registry.lookup_ip(ip)
        except Exception:
            log.exception("registry lookup of %s failed", ip)
            return None
        if node is None:
            return None
        for nic in node.nics:
            if nic.ip == ip:
                return nic.mac
        return node.mac

    async def purge(self, macs: set[str]) -> list[Lease]:
        """End the leases and offers of ``macs`` and wait until that is on disk."""
        ended = self.leases.purge(macs)
        for mac in macs:
            self.policy.forget_unknown(mac)
        done = asyncio.get_running_loop().create_future()
        self.leases.when_durable(lambda: done.done() or done.set_result(None))
        try:
            await asyncio.wait_for(done, PURGE_TIMEOUT)
        except TimeoutError:
            raise LeaseStoreError("the purge is not on disk yet (lease store commit failing?)",
                                  hint="see the server's log") from None
        return ended

    def _close_sockets(self) -> None:
        for endpoint in self.sockets:
            endpoint.close()
        self.sockets.clear()
        self._endpoints.clear()

    async def close(self) -> None:
        """Stop answering, let the commit in flight finish, and close the lease store."""
        self._close_sockets()
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry_task
        await self.leases.drain()
        self.leases.close()


async def start_dhcp(config: ServerConfig, registry: Registry, *, server_address: str,
                     http_base: str, tftp_enabled: bool) -> DhcpService:
    """Open the lease store and (unless mode is ``off``) the DHCP sockets on the interface."""
    leases = LeaseStore(config.state_dir / "leases.sqlite")
    policy = DhcpPolicy(config.dhcp, registry, leases, server_address=server_address,
                        http_base=http_base, tftp_enabled=tftp_enabled)
    service = DhcpService(config, registry, leases, policy)
    try:
        await service.open()
    except BaseException:
        leases.close()
        raise
    log.info("DHCP %s mode on %s, server address %s", config.dhcp.mode,
             config.interface or "all interfaces", server_address)
    return service
