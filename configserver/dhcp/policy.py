"""Decides every DHCP answer from the registry and the lease store. No sockets here.

``DhcpPolicy.answer`` takes a decoded request and returns a ``Reply`` (or None: stay silent).
Full mode hands out reserved addresses (per NIC, from the registry) and pool addresses; proxy
mode only adds boot information for PXE clients. Boot information depends on who asks
(firmware PXE, iPXE, UEFI HTTP boot): see ``boot_answer``.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from configserver.config import DhcpConfig, DhcpMode
from configserver.dhcp import codec
from configserver.dhcp.codec import DhcpPacket, MessageType
from configserver.dhcp.guard import TokenBuckets, Window
from configserver.dhcp.leases import LeaseState, LeaseStore
from configserver.dhcp.options import (
    BootClient,
    BootStage,
    classify,
    pxe_vendor_options,
    u32,
)
from configserver.dhcp.plan import RecentlyUnknown, SubnetPlan
from configserver.errors import TooManyPending
from configserver.model import Nic, Node, NodeState, UnknownMacPolicy
from configserver.ratelog import RateLimitedLog, worth_logging
from configserver.registry import Registry

log = logging.getLogger(__name__)

OFFER_HOLD = 60.0
EXHAUSTED_RESCAN = 1.0  # seconds before a full pool is scanned again
EXHAUSTED_LOG_INTERVAL = 60.0
SEEN_AGAIN_AFTER = 60.0  # a pending node asking again refreshes its last_seen this often
PROXY_PORT = "proxy"
INSTANCE_ROLE = "instance"  # what an instance's NIC is to the DHCP server
DHCP_PORT = "dhcp"


@dataclass(frozen=True)
class Reply:
    """An answer to send; ``durable`` ones go out only after the lease store commits."""

    packet: DhcpPacket
    durable: bool = False


@dataclass(frozen=True)
class BootAnswer:
    filename: str
    vendor_class: str
    tftp: bool


class DhcpPolicy:
    """The DHCP server's decisions; the only piece that consults the registry and leases."""

    def __init__(self, config: DhcpConfig, registry: Registry, leases: LeaseStore, *,
                 server_address: str, http_base: str, tftp_enabled: bool) -> None:
        self.config = config
        self.registry = registry
        self.leases = leases
        self.server_address = server_address
        self.server_id = ipaddress.IPv4Address(server_address).packed
        self.http_base = http_base.rstrip("/")
        self.tftp_enabled = tftp_enabled
        share = config.unknown_pool_share
        self.local: SubnetPlan | None = (
            SubnetPlan.build(config.subnet, config.lease_time, server_address, share)
            if config.subnet else None)
        self.relayed = [SubnetPlan.build(s, config.lease_time, server_address, share)
                        for s in config.relayed]
        self.event_failures = 0
        self.unknown_macs = RecentlyUnknown()
        self.unreserved = RecentlyUnknown()
        # Unregistered clients: new ones per relay/port, their share of a pool, new pending.
        self.new_unknown = TokenBuckets(config.unknown_rate, config.unknown_burst, leases.now)
        self.new_pending = Window(config.pending_per_window, config.pending_window, leases.now)
        self.refused = RateLimitedLog(log)
        self.share_refused = 0
        self._seed_unknown_holders()

    # -- entry point ------------------------------------------------------------------------

    def answer(self, request: DhcpPacket, port: str = DHCP_PORT) -> Reply | None:
        if request.op != codec.BOOTREQUEST or request.htype != 1 or len(request.chaddr) != 6:
            return None
        kind = request.message_type
        if kind is None:
            return None  # plain BOOTP: not served
        mac = request.mac
        client = classify(request)
        node = self._node(mac, client, kind)
        if port == PROXY_PORT or self.config.mode == DhcpMode.PROXY:
            return self._proxy(request, kind, mac, node, client=client, port=port)
        if self.config.mode != DhcpMode.FULL:
            return None
        plan = self._plan_for(request)
        if plan is None:
            return None
        if kind == MessageType.DISCOVER:
            return self._offer(request, mac, node, client, plan)
        if kind == MessageType.REQUEST:
            return self._request(request, mac, node, client, plan)
        if kind == MessageType.RELEASE:
            self._release(request, mac)
        elif kind == MessageType.DECLINE:
            self._decline(request, mac)
        elif kind == MessageType.INFORM:
            return self._inform(request, mac, node, client, plan)
        return None

    # -- registry ---------------------------------------------------------------------------

    def _node(self, mac: str, client: BootClient, kind: MessageType) -> Node | None:
        # Boot loaders always ask the registry; OS clients may use a recent "unknown".
        if client.stage == BootStage.NONE and mac in self.unknown_macs:
            return None
        node = self.registry.lookup(mac) or self._instance(mac)
        if node is None and client.stage == BootStage.NONE:
            self.unknown_macs.add(mac)
        if node is not None and node.role == INSTANCE_ROLE:
            return node  # a guest's NIC: its address and name, never a boot or a timeline
        if client.stage != BootStage.NONE and kind == MessageType.DISCOVER and (
                node is None or node.state == NodeState.PENDING) \
                and self.registry.unknown_mac_policy() == UnknownMacPolicy.DISCOVER:
            node = self._discover(mac, node, client)
        if node is not None:
            detail = {"arch": client.arch, "user_class": client.user_class,
                      "stage": str(client.stage)}
            # A boot loader's DISCOVER starts a boot of a registered or lost node (never of a
            # ready one: the registry leaves those to their agent sessions).
            booting = client.stage != BootStage.NONE and kind == MessageType.DISCOVER
            self._record(mac, f"dhcp.{kind.name.lower()}", detail, booting=booting)
        return node

    def _instance(self, mac: str) -> Node | None:
        """An instance's NIC as a ready node of role ``instance`` (its reserved IP and the
        instance's name as hostname), or None."""
        found = self.registry.instance_nic(mac)
        if found is None:
            return None
        instance, nic = found
        return Node(mac=mac, role=INSTANCE_ROLE, hostname=instance.name,
                    nics=(Nic(mac, nic.ip),), state=NodeState.READY)

    def _discover(self, mac: str, node: Node | None, client: BootClient) -> Node | None:
        """Record an unknown PXE client as pending (at most ``pending_per_window`` new ones
        per window), or refresh a pending one's last_seen; None if it is not recorded."""
        facts = {"arch": client.arch, "vendor_class": client.vendor_class,
                 "user_class": client.user_class}
        if node is not None:
            if self.leases.now() - (node.last_seen or 0.0) >= SEEN_AGAIN_AFTER:
                self.registry.discover(mac, facts)  # seen again: keeps it from expiring
            return node
        if not self.new_pending.take():
            self.refused.warning("%s: unknown PXE client not recorded: %d new pending nodes "
                                 "per %.0f s already (%d refused so far)", mac,
                                 self.config.pending_per_window, self.config.pending_window,
                                 self.new_pending.refused)
            return None
        try:
            node = self.registry.discover(mac, facts)
        except TooManyPending as exc:
            self.refused.warning("%s: %s", mac, exc.message)
            return None
        log.info("%s: unknown PXE client recorded as pending node", mac)
        return node

    def _event(self, node: Node | None, mac: str, stage: str, **detail: object) -> None:
        if node is not None and node.role != INSTANCE_ROLE:
            self._record(mac, stage, detail)

    def _record(self, mac: str, stage: str, detail: dict[str, object], *,
                booting: bool = False) -> None:
        """Boot events are best effort: a registry write error must not cost the answer."""
        try:
            self.registry.record_event(mac, stage, detail, booting=booting)
        except Exception as exc:
            self.event_failures += 1
            if worth_logging(self.event_failures):
                log.warning("%s: boot event %s not recorded (%d failures so far): %s", mac,
                            stage, self.event_failures, exc)

    # -- boot information -------------------------------------------------------------------

    def boot_answer(self, mac: str, node: Node | None, client: BootClient) -> BootAnswer | None:
        """What a boot loader should fetch next, or None if it gets no boot information.

        Unknown MACs get nothing unless the registry's policy recorded them (``discover``).
        With TFTP disabled, firmware PXE clients get nothing: they cannot fetch over HTTP.
        """
        if node is None or client.stage == BootStage.NONE or node.role == INSTANCE_ROLE:
            return None
        if client.stage == BootStage.IPXE:
            return BootAnswer(f"{self.http_base}/boot/{mac}.ipxe", "PXEClient", tftp=False)
        binary = self._binary(client)
        if client.stage == BootStage.HTTP_BOOT:
            return BootAnswer(f"{self.http_base}/ipxe/{binary}", "HTTPClient", tftp=False)
        if not self.tftp_enabled:
            return None
        return BootAnswer(binary, "PXEClient", tftp=True)

    def _binary(self, client: BootClient) -> str:
        if client.is_arm64:
            return self.config.arm64_bootfile
        if client.is_uefi:
            return self.config.uefi_bootfile
        return self.config.bios_bootfile

    def _add_boot(self, reply: DhcpPacket, boot: BootAnswer | None,
                  client: BootClient) -> None:
        if boot is None:
            return
        name = boot.filename.encode()
        reply.options[codec.OPT_VENDOR_CLASS] = boot.vendor_class.encode()
        reply.options[codec.OPT_BOOTFILE] = name
        if len(name) <= 127:
            reply.file = name
        if boot.tftp:
            reply.siaddr = self.server_address
            reply.options[codec.OPT_TFTP_SERVER] = self.server_address.encode()
            if client.stage == BootStage.FIRMWARE_PXE:
                reply.options[codec.OPT_VENDOR] = pxe_vendor_options()
        elif client.stage == BootStage.IPXE:
            reply.siaddr = self.server_address

    # -- full mode --------------------------------------------------------------------------

    def _plan_for(self, request: DhcpPacket) -> SubnetPlan | None:
        if request.giaddr != "0.0.0.0":
            for plan in (*self.relayed, *([self.local] if self.local else [])):
                if plan.contains(request.giaddr):
                    return plan
            return None
        return self.local

    def _reserved(self, mac: str, node: Node | None, plan: SubnetPlan) -> str | None:
        if node is None:
            return None
        ip = node.ip_for(mac)
        return ip if ip is not None and plan.contains(ip) else None

    def _acceptable(self, mac: str, node: Node | None, plan: SubnetPlan, ip: str) -> bool:
        """Whether ``mac`` may hold ``ip`` on ``plan``'s subnet (reservations win)."""
        reserved = self._reserved(mac, node, plan)
        if reserved is not None:
            return ip == reserved
        if not plan.in_pool(ip) or ip in plan.excluded:
            return False
        if not self.leases.is_free_for(ip, mac):
            return False
        if ip in self.unreserved:
            return True
        if self.registry.lookup_ip(ip) is not None:
            return False
        self.unreserved.add(ip)
        return True

    def _choose(self, request: DhcpPacket, mac: str, node: Node | None,
                plan: SubnetPlan) -> str | None:
        reserved = self._reserved(mac, node, plan)
        if reserved is not None:
            return reserved
        current = self.leases.by_mac(mac)
        if current is not None and self._acceptable(mac, node, plan, current.ip):
            return current.ip
        wanted = request.ip_option(codec.OPT_REQUESTED_IP)
        if wanted is not None and self._acceptable(mac, node, plan, wanted):
            return wanted
        return self._allocate(mac, node, plan)

    def _allocate(self, mac: str, node: Node | None, plan: SubnetPlan) -> str | None:
        size = plan.pool_end - plan.pool_start + 1
        now = self.leases.now()
        if size <= 0 or now - plan.exhausted_at < EXHAUSTED_RESCAN:
            return None  # no pool, or it was full a moment ago: do not rescan on every packet
        for _ in range(size):
            candidate = codec.int_to_ip(plan.cursor)
            plan.cursor = plan.cursor + 1 if plan.cursor < plan.pool_end else plan.pool_start
            if self._acceptable(mac, node, plan, candidate):
                return candidate
        plan.exhausted_at = now
        if now - plan.exhausted_logged_at >= EXHAUSTED_LOG_INTERVAL:
            plan.exhausted_logged_at = now
            log.warning("%s: DHCP pool %s-%s of %s exhausted (%d addresses, all leased, "
                        "offered, reserved or quarantined): no address offered", mac,
                        *(plan.subnet.pool or ("", "")), plan.subnet.network, size)
        return None

    def _reply(self, request: DhcpPacket, kind: MessageType, plan: SubnetPlan | None,
               node: Node | None, yiaddr: str = "0.0.0.0") -> DhcpPacket:
        reply = DhcpPacket(op=codec.BOOTREPLY, xid=request.xid, chaddr=request.chaddr,
                           htype=request.htype, flags=request.flags, yiaddr=yiaddr,
                           giaddr=request.giaddr)
        reply.options[codec.OPT_MESSAGE_TYPE] = bytes((kind,))
        reply.options[codec.OPT_SERVER_ID] = self.server_id
        if plan is not None and kind != MessageType.NAK:
            reply.options.update(plan.options)
            if node is not None and node.hostname:
                reply.options[codec.OPT_HOSTNAME] = node.hostname.encode()
        relay_info = request.options.get(codec.OPT_RELAY_AGENT)
        if relay_info is not None:
            reply.options[codec.OPT_RELAY_AGENT] = relay_info
        return reply

    def _lease_options(self, reply: DhcpPacket, lease_time: int) -> None:
        reply.options[codec.OPT_LEASE_TIME] = u32(lease_time)
        reply.options[codec.OPT_RENEWAL_TIME] = u32(lease_time // 2)
        reply.options[codec.OPT_REBINDING_TIME] = u32(lease_time * 7 // 8)

    def _offer(self, request: DhcpPacket, mac: str, node: Node | None, client: BootClient,
               plan: SubnetPlan) -> Reply | None:
        unknown = _unregistered(node)
        if unknown and not self._admit_unknown(request, mac, plan):
            return None
        ip = self._choose(request, mac, node, plan)
        if ip is None:
            return None
        lease = self.leases.offer(mac, ip, OFFER_HOLD)
        if unknown:
            plan.unknown.hold(mac, lease.expires)
        reply = self._reply(request, MessageType.OFFER, plan, node, ip)
        self._lease_options(reply, self._lease_time(plan, unknown))
        self._add_boot(reply, self.boot_answer(mac, node, client), client)
        self._event(node, mac, "dhcp.offer", ip=ip)
        return Reply(reply)

    def _request(self, request: DhcpPacket, mac: str, node: Node | None, client: BootClient,
                 plan: SubnetPlan) -> Reply | None:
        server_id = request.options.get(codec.OPT_SERVER_ID)
        if server_id is not None and server_id != self.server_id:
            self.leases.forget_offer(mac)  # SELECTING another server's offer
            return None
        if request.ciaddr != "0.0.0.0":
            ip = request.ciaddr  # RENEWING / REBINDING
        else:
            ip = request.ip_option(codec.OPT_REQUESTED_IP) or ""  # SELECTING / INIT-REBOOT
        if not ip or not self._acceptable(mac, node, plan, ip):
            init_reboot = server_id is None and request.ciaddr == "0.0.0.0"
            if (init_reboot and node is None and self.leases.by_mac(mac) is None
                    and _inside(ip, plan.network)):
                # RFC 2131 4.3.2: about a client it has no record of, a server stays silent.
                return None
            log.info("%s: DHCPNAK for %s", mac, ip or "no address")
            self._event(node, mac, "dhcp.nak", ip=ip)
            reply = self._reply(request, MessageType.NAK, plan, node)
            reply.options[codec.OPT_MESSAGE] = b"address not available"
            reply.flags |= codec.BROADCAST_FLAG if request.giaddr != "0.0.0.0" else 0
            return Reply(reply)
        unknown = _unregistered(node)
        if unknown and not self._admit_unknown(request, mac, plan):
            return None
        hostname = node.hostname if node is not None else (
            request.text_option(codec.OPT_HOSTNAME) or "").rstrip("\0") or None
        lease_time = self._lease_time(plan, unknown)
        lease = self.leases.bind(mac, ip, lease_time, hostname)
        if unknown:
            plan.unknown.hold(mac, lease.expires)
        reply = self._reply(request, MessageType.ACK, plan, node, ip)
        reply.ciaddr = request.ciaddr
        self._lease_options(reply, lease_time)
        self._add_boot(reply, self.boot_answer(mac, node, client), client)
        self._event(node, mac, "dhcp.ack", ip=ip)
        return Reply(reply, durable=True)

    # -- unregistered clients (see guard.py) ------------------------------------------------

    def _lease_time(self, plan: SubnetPlan, unknown: bool) -> int:
        return min(self.config.unknown_lease_time, plan.lease_time) if unknown \
            else plan.lease_time

    def _admit_unknown(self, request: DhcpPacket, mac: str, plan: SubnetPlan) -> bool:
        """Whether an unregistered MAC may take (or keep) an address of ``plan``'s pool.

        One that holds one already may; a new one needs a token of its relay's (or the local
        port's) bucket and room in the unregistered clients' share of the pool.
        """
        now = self.leases.now()
        current = self.leases.by_mac(mac)
        if plan.unknown.holds(mac, now) or (current is not None and current.active(now)
                                            and plan.in_pool(current.ip)):
            return True
        if plan.unknown.full(now):
            self.share_refused += 1
            self.refused.warning("%s: not answered: unregistered clients hold %d addresses of "
                                 "pool %s, their share (%d refused so far)", mac,
                                 plan.unknown.limit, plan.subnet.network, self.share_refused)
            return False
        if not self.new_unknown.take(request.giaddr):
            self.refused.warning("%s: not answered: new unregistered clients via %s exceed "
                                 "%g/s (%d refused so far)", mac, request.giaddr,
                                 self.config.unknown_rate, self.new_unknown.refused)
            return False
        return True

    def forget_unknown(self, mac: str) -> None:
        for plan in self._plans():
            plan.unknown.drop(mac)

    def _plans(self) -> list[SubnetPlan]:
        return [*([self.local] if self.local else []), *self.relayed]

    def _seed_unknown_holders(self) -> None:
        """After a restart: which stored leases unregistered MACs hold."""
        now = self.leases.now()
        for lease in self.leases:
            if not lease.active(now) or lease.state not in (LeaseState.BOUND,
                                                            LeaseState.OFFERED):
                continue
            for plan in self._plans():
                if plan.in_pool(lease.ip) and _unregistered(self.registry.lookup(lease.mac)):
                    plan.unknown.hold(lease.mac, lease.expires)

    def _release(self, request: DhcpPacket, mac: str) -> None:
        if request.options.get(codec.OPT_SERVER_ID, self.server_id) != self.server_id:
            return
        if self.leases.release(mac, request.ciaddr) is not None:
            self.forget_unknown(mac)
            log.info("%s: released %s", mac, request.ciaddr)

    def _decline(self, request: DhcpPacket, mac: str) -> None:
        if request.options.get(codec.OPT_SERVER_ID, self.server_id) != self.server_id:
            return
        ip = request.ip_option(codec.OPT_REQUESTED_IP)
        lease = self.leases.by_mac(mac)
        if ip is None or lease is None or lease.ip != ip:
            return
        self.leases.decline(mac, ip, self.config.decline_quarantine)
        self.forget_unknown(mac)
        log.warning("%s: declined %s (address in use?): quarantined for %d s", mac, ip,
                    self.config.decline_quarantine)

    def _inform(self, request: DhcpPacket, mac: str, node: Node | None, client: BootClient,
                plan: SubnetPlan) -> Reply | None:
        if request.ciaddr == "0.0.0.0":
            return None
        reply = self._reply(request, MessageType.ACK, plan, node)
        reply.ciaddr = request.ciaddr
        self._add_boot(reply, self.boot_answer(mac, node, client), client)
        return Reply(reply)

    # -- proxy mode (and port 4011 in either mode) ------------------------------------------

    def _proxy(self, request: DhcpPacket, kind: MessageType, mac: str, node: Node | None, *,
               client: BootClient, port: str) -> Reply | None:
        if client.stage == BootStage.NONE:
            return None  # never answer a non-PXE client in proxy mode
        if port == PROXY_PORT:
            if kind not in (MessageType.REQUEST, MessageType.INFORM, MessageType.DISCOVER):
                return None
            answer_kind = MessageType.ACK
        elif kind == MessageType.DISCOVER:
            answer_kind = MessageType.OFFER
        elif kind == MessageType.REQUEST \
                and request.options.get(codec.OPT_SERVER_ID) == self.server_id:
            answer_kind = MessageType.ACK
        else:
            return None
        boot = self.boot_answer(mac, node, client)
        if boot is None:
            return None
        reply = self._reply(request, answer_kind, None, node)
        reply.ciaddr = request.ciaddr
        uuid = request.options.get(codec.OPT_CLIENT_UUID)
        if uuid is not None:
            reply.options[codec.OPT_CLIENT_UUID] = uuid
        self._add_boot(reply, boot, client)
        if client.stage != BootStage.FIRMWARE_PXE and boot.vendor_class == "PXEClient":
            # iPXE recognises a ProxyDHCP offer by option 60 and asks port 4011 next.
            reply.options.setdefault(codec.OPT_VENDOR, pxe_vendor_options())
        self._event(node, mac, f"dhcp.proxy_{answer_kind.name.lower()}",
                    filename=boot.filename)
        return Reply(reply)


__all__ = ["DHCP_PORT", "PROXY_PORT", "BootAnswer", "DhcpPolicy", "RecentlyUnknown", "Reply",
           "SubnetPlan"]


def _unregistered(node: Node | None) -> bool:
    """Unknown to the registry, or only discovered (pending): gets the guarded treatment."""
    return node is None or node.state == NodeState.PENDING


def _inside(ip: str, network: ipaddress.IPv4Network) -> bool:
    try:
        return ipaddress.IPv4Address(ip) in network
    except ValueError:
        return False
