"""DHCP answer policy: reservations, pool, boot answers per client, proxy mode, relays."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from configserver.config import DhcpConfig, DhcpMode, Subnet
from configserver.dhcp import codec
from configserver.dhcp.codec import DhcpPacket, MessageType
from configserver.dhcp.leases import LeaseStore
from configserver.dhcp.policy import PROXY_PORT, DhcpPolicy, RecentlyUnknown
from configserver.model import Nic, NodeSpec, NodeState, UnknownMacPolicy
from configserver.registry.sqlite import SqliteRegistry

SERVER = "198.18.0.1"
HTTP = "http://198.18.0.1:8080"
NODE_MAC = "52:54:00:00:00:01"
SECOND_NIC = "52:54:00:00:00:11"
STRANGER = "52:54:00:00:00:99"
BIOS_PXE = {60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\0\0"}
UEFI_PXE = {60: b"PXEClient:Arch:00007:UNDI:003016", 93: b"\0\x07"}
ARM_PXE = {60: b"PXEClient:Arch:00011:UNDI:003016", 93: b"\0\x0b"}
IPXE = {60: b"PXEClient:Arch:00000:UNDI:002001", 77: b"iPXE", 93: b"\0\0"}
HTTP_BOOT = {60: b"HTTPClient:Arch:00016:UNDI:003001", 93: b"\0\x10"}
LOCAL = Subnet("198.18.0.0/24", router="198.18.0.1", pool=("198.18.0.100", "198.18.0.102"),
               dns=("198.18.0.1",), domain="rack.test", mtu=9000, lease_time=600)
RELAYED = Subnet("198.19.4.0/24", router="198.19.4.1", pool=("198.19.4.10", "198.19.4.20"))


@pytest.fixture
def registry(tmp_path):
    reg = SqliteRegistry(tmp_path / "registry.sqlite")
    reg.add_node(NodeSpec(mac=NODE_MAC, role="storage", hostname="st1", ip="198.18.0.50",
                          extra_nics=(Nic(SECOND_NIC, "198.19.4.50"),)))
    yield reg
    reg.close()


@pytest.fixture
def leases(tmp_path):
    store = LeaseStore(tmp_path / "leases.sqlite")
    yield store
    store.close()


def make_policy(registry, leases, mode=DhcpMode.FULL, tftp=True, **changes):
    # The pools here are tiny: unregistered clients may use all of them unless a test says.
    changes.setdefault("unknown_pool_share", 1.0)
    config = replace(DhcpConfig(mode=mode, subnet=LOCAL, relayed=(RELAYED,)), **changes)
    return DhcpPolicy(config, registry, leases, server_address=SERVER, http_base=HTTP,
                      tftp_enabled=tftp)


def packet(mac, kind, options=None, **fields):
    opts = {codec.OPT_MESSAGE_TYPE: bytes((kind,)), **(options or {})}
    built = DhcpPacket(op=codec.BOOTREQUEST, xid=0x1234, chaddr=bytes.fromhex(
        mac.replace(":", "")), options=opts, **fields)
    return codec.decode(codec.encode(built))  # every request goes through the wire format


def request_for(mac, ip, options=None, server=SERVER, **fields):
    opts = {codec.OPT_REQUESTED_IP: ipaddress.IPv4Address(ip).packed, **(options or {})}
    if server:
        opts[codec.OPT_SERVER_ID] = ipaddress.IPv4Address(server).packed
    return packet(mac, MessageType.REQUEST, opts, **fields)


def dora(policy, mac, options=None, **fields):
    offer = policy.answer(packet(mac, MessageType.DISCOVER, options, **fields))
    assert offer is not None and offer.packet.message_type == MessageType.OFFER
    ack = policy.answer(request_for(mac, offer.packet.yiaddr, options, **fields))
    assert ack is not None
    return offer, ack


def test_reserved_address_hostname_and_subnet_options(registry, leases):
    offer, ack = dora(make_policy(registry, leases), NODE_MAC)
    assert offer.packet.yiaddr == "198.18.0.50" and not offer.durable
    assert ack.packet.message_type == MessageType.ACK and ack.durable
    options = ack.packet.options
    assert options[codec.OPT_HOSTNAME] == b"st1"
    assert options[codec.OPT_ROUTER] == ipaddress.IPv4Address("198.18.0.1").packed
    assert options[codec.OPT_SUBNET_MASK] == bytes((255, 255, 255, 0))
    assert options[codec.OPT_DOMAIN] == b"rack.test"
    assert options[codec.OPT_MTU] == (9000).to_bytes(2, "big")
    assert options[codec.OPT_LEASE_TIME] == (600).to_bytes(4, "big")
    assert options[codec.OPT_SERVER_ID] == ipaddress.IPv4Address(SERVER).packed
    assert codec.OPT_BOOTFILE not in options  # an OS client gets no boot file
    assert leases.by_mac(NODE_MAC).ip == "198.18.0.50"


def test_unknown_mac_gets_pool_addresses_until_exhausted(registry, leases, caplog):
    policy = make_policy(registry, leases)
    got = [dora(policy, f"52:54:00:00:01:{i:02x}")[1].packet.yiaddr for i in range(3)]
    assert got == ["198.18.0.100", "198.18.0.101", "198.18.0.102"]
    assert policy.answer(packet("52:54:00:00:01:ff", MessageType.DISCOVER)) is None
    assert "exhausted" in caplog.text


@pytest.mark.parametrize(("options", "expected"), [
    (BIOS_PXE, (b"undionly.kpxe", SERVER, b"PXEClient")),
    (UEFI_PXE, (b"ipxe.efi", SERVER, b"PXEClient")),
    (ARM_PXE, (b"ipxe-arm64.efi", SERVER, b"PXEClient")),
    (IPXE, (f"{HTTP}/boot/{NODE_MAC}.ipxe".encode(), SERVER, b"PXEClient")),
    (HTTP_BOOT, (f"{HTTP}/ipxe/ipxe.efi".encode(), "0.0.0.0", b"HTTPClient")),
])
def test_boot_answers(registry, leases, options, expected):
    filename, siaddr, vendor = expected
    offer, ack = dora(make_policy(registry, leases), NODE_MAC, options)
    for reply in (offer.packet, ack.packet):
        assert reply.options[codec.OPT_BOOTFILE] == filename
        assert reply.file == filename
        assert reply.siaddr == siaddr
        assert reply.options[codec.OPT_VENDOR_CLASS] == vendor
        assert reply.yiaddr == "198.18.0.50"
    tftp = options is not IPXE and options is not HTTP_BOOT
    assert (codec.OPT_TFTP_SERVER in offer.packet.options) == tftp
    assert (codec.OPT_VENDOR in offer.packet.options) == tftp


def test_uefi_bootfile_is_configurable(registry, leases):
    policy = make_policy(registry, leases, uefi_bootfile="snponly.efi")
    offer, _ = dora(policy, NODE_MAC, UEFI_PXE)
    assert offer.packet.options[codec.OPT_BOOTFILE] == b"snponly.efi"


def test_without_tftp_firmware_pxe_gets_address_only(registry, leases):
    offer, _ = dora(make_policy(registry, leases, tftp=False), NODE_MAC, UEFI_PXE)
    assert offer.packet.yiaddr == "198.18.0.50"
    assert codec.OPT_BOOTFILE not in offer.packet.options
    ipxe_offer, _ = dora(make_policy(registry, leases, tftp=False), NODE_MAC, IPXE)
    assert ipxe_offer.packet.options[codec.OPT_BOOTFILE].startswith(HTTP.encode())


def test_unknown_pxe_client_ignored_or_discovered(registry, leases):
    policy = make_policy(registry, leases)
    offer, _ = dora(policy, STRANGER, BIOS_PXE)
    assert codec.OPT_BOOTFILE not in offer.packet.options
    assert registry.lookup(STRANGER) is None
    registry.set_unknown_mac_policy(UnknownMacPolicy.DISCOVER)
    offer, _ = dora(policy, STRANGER, BIOS_PXE)
    assert offer.packet.options[codec.OPT_BOOTFILE] == b"undionly.kpxe"
    node = registry.lookup(STRANGER)
    assert node is not None and node.state == "pending"
    assert node.facts["arch"] == 0
    assert node.facts["vendor_class"].startswith("PXEClient")


def test_every_stage_is_a_boot_event(registry, leases):
    dora(make_policy(registry, leases), NODE_MAC, BIOS_PXE)
    stages = [e.stage for e in registry.events(NODE_MAC)]
    assert stages[stages.index("dhcp.discover") + 1] == "state"
    assert {"dhcp.offer", "dhcp.request", "dhcp.ack"} <= set(stages)
    discover = next(e for e in registry.events(NODE_MAC) if e.stage == "dhcp.discover")
    assert discover.detail["arch"] == 0
    assert registry.lookup(NODE_MAC).state == "booting"


def test_one_lease_per_mac_across_client_ids(registry, leases):
    policy = make_policy(registry, leases)
    mac = "52:54:00:00:02:01"
    first = dora(policy, mac, {**BIOS_PXE, codec.OPT_CLIENT_ID: b"\x01rom"})[1].packet.yiaddr
    second = dora(policy, mac, {**IPXE, codec.OPT_CLIENT_ID: b"\x00\x01\x02"})[1].packet.yiaddr
    third = dora(policy, mac, {codec.OPT_CLIENT_ID: b"\xffos-duid"})[1].packet.yiaddr
    assert first == second == third
    assert len(list(leases)) == 1


def test_request_for_wrong_address_is_nakked(registry, leases):
    policy = make_policy(registry, leases)
    reply = policy.answer(request_for(NODE_MAC, "198.18.0.101", server=None))
    assert reply.packet.message_type == MessageType.NAK
    assert reply.packet.yiaddr == "0.0.0.0"
    outside = policy.answer(request_for(STRANGER, "10.1.2.3", server=None))
    assert outside.packet.message_type == MessageType.NAK


def test_selecting_another_server_frees_our_offer(registry, leases):
    policy = make_policy(registry, leases)
    offer = policy.answer(packet(STRANGER, MessageType.DISCOVER))
    assert policy.answer(request_for(STRANGER, offer.packet.yiaddr, server="198.18.0.9")) is None
    assert leases.by_ip(offer.packet.yiaddr) is None


def test_init_reboot_renew_and_rebind(registry, leases):
    policy = make_policy(registry, leases)
    _, ack = dora(policy, STRANGER)
    ip = ack.packet.yiaddr
    reboot = policy.answer(request_for(STRANGER, ip, server=None))
    assert reboot.packet.message_type == MessageType.ACK and reboot.packet.yiaddr == ip
    renew = policy.answer(packet(STRANGER, MessageType.REQUEST, ciaddr=ip))
    assert renew.packet.message_type == MessageType.ACK and renew.packet.ciaddr == ip
    # RFC 2131 4.3.2: a client we have no record of gets silence, not a NAK...
    assert policy.answer(request_for("52:54:00:00:03:01", ip, server=None)) is None
    # ...while one we know, asking for an address that is not its own, is told no.
    _, other = dora(policy, "52:54:00:00:03:01")
    wrong = policy.answer(request_for("52:54:00:00:03:01", ip, server=None))
    assert other.packet.yiaddr != ip
    assert wrong.packet.message_type == MessageType.NAK


def test_release_and_decline(registry, leases):
    policy = make_policy(registry, leases, decline_quarantine=300)
    _, ack = dora(policy, STRANGER)
    ip = ack.packet.yiaddr
    assert policy.answer(packet(STRANGER, MessageType.RELEASE, ciaddr=ip)) is None
    assert leases.by_ip(ip).state == "released"
    # Declined: quarantined, the client gets another address next time.
    _, ack = dora(policy, STRANGER)
    ip = ack.packet.yiaddr
    decline = packet(STRANGER, MessageType.DECLINE, {
        codec.OPT_REQUESTED_IP: ipaddress.IPv4Address(ip).packed,
        codec.OPT_SERVER_ID: ipaddress.IPv4Address(SERVER).packed})
    assert policy.answer(decline) is None
    assert leases.by_ip(ip).state == "declined"
    assert dora(policy, STRANGER)[1].packet.yiaddr != ip
    assert dora(policy, "52:54:00:00:03:02")[1].packet.yiaddr != ip


def test_inform_gets_options_without_lease(registry, leases):
    reply = make_policy(registry, leases).answer(
        packet(NODE_MAC, MessageType.INFORM, ciaddr="198.18.0.50"))
    assert reply.packet.message_type == MessageType.ACK
    assert reply.packet.yiaddr == "0.0.0.0"
    assert codec.OPT_LEASE_TIME not in reply.packet.options
    assert reply.packet.options[codec.OPT_ROUTER] == ipaddress.IPv4Address(SERVER).packed


def test_reservation_wins_over_dynamic_lease(registry, leases):
    policy = make_policy(registry, leases)
    _, ack = dora(policy, STRANGER)
    taken = ack.packet.yiaddr
    registry.add_node(NodeSpec(mac="52:54:00:00:04:01", role="storage", ip=taken))
    assert dora(policy, "52:54:00:00:04:01")[1].packet.yiaddr == taken
    renew = policy.answer(packet(STRANGER, MessageType.REQUEST, ciaddr=taken))
    assert renew.packet.message_type == MessageType.NAK


def test_relayed_request_uses_the_relays_subnet(registry, leases):
    policy = make_policy(registry, leases)
    relay_info = bytes.fromhex("0104deadbeef")
    _, ack = dora(policy, STRANGER, {codec.OPT_RELAY_AGENT: relay_info}, giaddr="198.19.4.1",
                  hops=1)
    assert ack.packet.yiaddr == "198.19.4.10"
    assert ack.packet.giaddr == "198.19.4.1"
    assert ack.packet.options[codec.OPT_ROUTER] == ipaddress.IPv4Address("198.19.4.1").packed
    assert ack.packet.options[codec.OPT_RELAY_AGENT] == relay_info
    # The node's second NIC is reserved on the relayed subnet.
    assert dora(policy, SECOND_NIC, giaddr="198.19.4.1")[1].packet.yiaddr == "198.19.4.50"
    # A relay for a subnet we do not serve gets nothing.
    assert policy.answer(packet(STRANGER, MessageType.DISCOVER, giaddr="198.20.0.1")) is None


def test_proxy_mode_answers_pxe_clients_only_without_addresses(registry, leases):
    policy = make_policy(registry, leases, mode=DhcpMode.PROXY)
    assert policy.answer(packet(NODE_MAC, MessageType.DISCOVER)) is None
    offer = policy.answer(packet(NODE_MAC, MessageType.DISCOVER, {
        **BIOS_PXE, codec.OPT_CLIENT_UUID: b"\0" + bytes(16)}))
    assert offer.packet.message_type == MessageType.OFFER
    assert offer.packet.yiaddr == "0.0.0.0"
    assert offer.packet.options[codec.OPT_BOOTFILE] == b"undionly.kpxe"
    assert offer.packet.options[codec.OPT_VENDOR] == bytes((6, 1, 8, 255))
    assert offer.packet.options[codec.OPT_CLIENT_UUID] == b"\0" + bytes(16)
    assert codec.OPT_LEASE_TIME not in offer.packet.options
    # The REQUEST to the real DHCP server is not ours to answer.
    assert policy.answer(request_for(NODE_MAC, "198.18.0.77", BIOS_PXE,
                                     server="198.18.0.9")) is None
    # iPXE's ProxyDHCP REQUEST on port 4011.
    ack = policy.answer(packet(NODE_MAC, MessageType.REQUEST, IPXE, ciaddr="198.18.0.77"),
                        PROXY_PORT)
    assert ack.packet.message_type == MessageType.ACK
    assert ack.packet.yiaddr == "0.0.0.0"
    assert ack.packet.options[codec.OPT_BOOTFILE] == f"{HTTP}/boot/{NODE_MAC}.ipxe".encode()
    assert not list(leases)
    # Unknown PXE clients are ignored under the default policy.
    assert policy.answer(packet(STRANGER, MessageType.DISCOVER, BIOS_PXE)) is None


def test_off_mode_answers_nothing(registry, leases):
    policy = make_policy(registry, leases, mode=DhcpMode.OFF)
    assert policy.answer(packet(NODE_MAC, MessageType.DISCOVER, BIOS_PXE)) is None


def test_bootp_and_non_ethernet_requests_are_ignored(registry, leases):
    policy = make_policy(registry, leases)
    bootp = DhcpPacket(op=1, xid=1, chaddr=bytes.fromhex("525400000001"))
    assert policy.answer(codec.decode(codec.encode(bootp))) is None
    infiniband = packet(NODE_MAC, MessageType.DISCOVER, htype=32)
    assert policy.answer(infiniband) is None


def test_a_failing_event_write_does_not_cost_the_answer(registry, leases, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(registry, "record_event", broken)
    policy = make_policy(registry, leases)
    _, ack = dora(policy, NODE_MAC, BIOS_PXE)
    assert ack.packet.yiaddr == "198.18.0.50"
    assert policy.event_failures >= 4
    assert caplog.text.count("not recorded") == 1


def test_registry_changes_reach_os_clients_within_the_negative_cache_ttl(registry, leases):
    now = [100.0]
    policy = make_policy(registry, leases)
    policy.unknown_macs = RecentlyUnknown(ttl=2.0, clock=lambda: now[0])
    policy.unreserved = RecentlyUnknown(ttl=2.0, clock=lambda: now[0])
    mac = "52:54:00:00:05:01"
    first = dora(policy, mac)[1].packet.yiaddr
    assert first.startswith("198.18.0.10")
    registry.add_node(NodeSpec(mac=mac, role="storage", ip="198.18.0.60"))
    now[0] += 2.5
    offer, ack = dora(policy, mac)
    assert offer.packet.yiaddr == ack.packet.yiaddr == "198.18.0.60"
    # Boot loaders never use the cache: a PXE client is looked up every time.
    policy.unknown_macs.add("52:54:00:00:05:02")
    registry.add_node(NodeSpec(mac="52:54:00:00:05:02", role="storage", ip="198.18.0.61"))
    assert dora(policy, "52:54:00:00:05:02", BIOS_PXE)[0].packet.yiaddr == "198.18.0.61"


def test_recently_unknown_expires_and_stays_bounded():
    now = [0.0]
    cache = RecentlyUnknown(ttl=1.0, limit=3, clock=lambda: now[0])
    cache.add("a")
    assert "a" in cache and "b" not in cache
    now[0] = 1.5
    assert "a" not in cache
    for key in "bcde":
        cache.add(key)
    assert len(cache._until) <= 3


def test_an_ipxe_rom_starts_a_boot_but_no_dhcp_packet_moves_a_ready_node(registry, leases):
    policy = make_policy(registry, leases)
    dora(policy, NODE_MAC, IPXE)  # an iPXE ROM as the firmware (the farm's VMs)
    assert registry.lookup(NODE_MAC).state == "booting"
    registry.set_state(NODE_MAC, NodeState.READY, "its agent heartbeats")
    for options in (BIOS_PXE, IPXE, None):
        dora(policy, NODE_MAC, options)  # anyone can send these naming its MAC
    registry.events(NODE_MAC)  # commits what is queued
    assert registry.lookup(NODE_MAC).state == "ready"


GUEST_MAC = "00:16:3e:12:34:56"


def guest_registry(registry):
    from configserver.cloud.instances import Instance, InstanceNic
    registry.create_instance(Instance(id="0123456789abcdef", name="web", memory=256 << 20,
                                      vcpus=1, volume=None,
                                      nics=(InstanceNic(GUEST_MAC, "198.18.0.150"),)))
    return registry


@pytest.mark.parametrize("options", [None, IPXE, BIOS_PXE, HTTP_BOOT])
def test_an_instance_nic_gets_its_address_and_name_and_never_a_boot_file(registry, leases,
                                                                          options):
    offer, ack = dora(make_policy(guest_registry(registry), leases), GUEST_MAC, options)
    for reply in (offer.packet, ack.packet):
        assert reply.yiaddr == "198.18.0.150"
        assert reply.options[codec.OPT_HOSTNAME] == b"web"
        assert reply.options[codec.OPT_ROUTER] == ipaddress.IPv4Address("198.18.0.1").packed
        assert codec.OPT_BOOTFILE not in reply.options and reply.file == b""
    assert ack.packet.message_type == MessageType.ACK
    assert registry.events(GUEST_MAC) == []  # guests have no boot timeline


def test_an_instance_nic_gets_nothing_from_proxy_dhcp(registry, leases):
    policy = make_policy(guest_registry(registry), leases, mode=DhcpMode.PROXY)
    assert policy.answer(packet(GUEST_MAC, MessageType.DISCOVER, IPXE)) is None


def test_an_instance_nic_asking_for_another_address_is_refused(registry, leases):
    policy = make_policy(guest_registry(registry), leases)
    nak = policy.answer(request_for(GUEST_MAC, "198.18.0.101"))
    assert nak is not None and nak.packet.message_type == MessageType.NAK
