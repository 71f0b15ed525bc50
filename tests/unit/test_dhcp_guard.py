"""Issue 13: floods of random MACs, spoofed PXE machines and fake relays (fake clocks)."""

from __future__ import annotations

import random

import pytest
from test_dhcp_policy import (
    BIOS_PXE,
    HTTP,
    LOCAL,
    NODE_MAC,
    SERVER,
    make_policy,
    packet,
    request_for,
)

from configserver.config import DhcpConfig, DhcpMode, ServerConfig, Subnet, from_mapping
from configserver.dhcp import codec
from configserver.dhcp.codec import DhcpPacket, MessageType
from configserver.dhcp.guard import TokenBuckets, UnknownHolders, Window
from configserver.dhcp.leases import LeaseStore
from configserver.dhcp.policy import DHCP_PORT, DhcpPolicy
from configserver.dhcp.service import DhcpService
from configserver.errors import ConfigError
from configserver.model import NodeSpec, NodeState, UnknownMacPolicy
from configserver.registry.sqlite import MAX_PENDING, SqliteRegistry

POOL = ("198.18.0.100", "198.18.0.199")  # 100 addresses


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def stores(tmp_path, clock):
    registry = SqliteRegistry(tmp_path / "registry.sqlite", clock=clock)
    registry.add_node(NodeSpec(mac=NODE_MAC, role="storage", hostname="st1"))  # no reservation
    leases = LeaseStore(tmp_path / "leases.sqlite", clock=clock)
    yield registry, leases
    leases.close()
    registry.close()


def random_macs(count, seed=13):
    rng = random.Random(seed)
    return ["02:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(5)) for _ in range(count)]


def flood(policy, macs, *, requests=True):
    """Each MAC sends a DISCOVER, then a REQUEST naming our server (as perfdhcp does)."""
    bound = 0
    for mac in macs:
        offer = policy.answer(packet(mac, MessageType.DISCOVER))
        wanted = offer.packet.yiaddr if offer else POOL[0]
        if requests:
            ack = policy.answer(request_for(mac, wanted))
            bound += ack is not None and ack.packet.message_type == MessageType.ACK
    return bound


def lease_time(reply):
    return int.from_bytes(reply.packet.options[codec.OPT_LEASE_TIME], "big")


def test_random_mac_flood_binds_only_a_burst_and_short_leases(stores, clock):
    registry, leases = stores
    policy = make_policy(registry, leases, subnet=Subnet(LOCAL.network, pool=POOL),
                         unknown_pool_share=0.5, unknown_rate=20.0, unknown_burst=30,
                         unknown_lease_time=300, lease_time=3600)
    bound = flood(policy, random_macs(100))  # 100 random MACs within the same second
    assert bound == 30
    held = [lease for lease in leases if lease.active(clock.now)]
    assert len(held) == 30
    # The unregistered clients' leases end in 300 s, not in an hour.
    assert {lease.expires - clock.now for lease in held if lease.state == "bound"} == {300}
    # A registered node (no reservation) is not limited and gets the normal lease time.
    offer = policy.answer(packet(NODE_MAC, MessageType.DISCOVER))
    assert offer is not None and lease_time(offer) == 3600
    ack = policy.answer(request_for(NODE_MAC, offer.packet.yiaddr))
    assert ack.packet.message_type == MessageType.ACK and lease_time(ack) == 3600
    # A legitimate new client a second later gets an address (the bucket refilled a bit).
    clock.now += 1.0
    offer = policy.answer(packet("52:54:00:00:07:01", MessageType.DISCOVER))
    assert offer is not None and lease_time(offer) == 300
    # Renewals of the clients already bound are never rate limited.
    first = next(lease for lease in leases if lease.state == "bound" and lease.mac != NODE_MAC)
    renew = policy.answer(packet(first.mac, MessageType.REQUEST, ciaddr=first.ip))
    assert renew is not None and renew.packet.message_type == MessageType.ACK


def test_unregistered_clients_hold_at_most_their_share_and_age_out(stores, clock):
    registry, leases = stores
    policy = make_policy(registry, leases, subnet=Subnet(LOCAL.network, pool=POOL),
                         unknown_pool_share=0.5, unknown_rate=1000.0, unknown_burst=1000,
                         unknown_lease_time=300)
    assert flood(policy, random_macs(100)) == 50  # half of the 100 addresses
    assert policy.answer(packet("52:54:00:00:07:01", MessageType.DISCOVER)) is None
    # The other half is there for registered nodes.
    ack = policy.answer(request_for(NODE_MAC, policy.answer(
        packet(NODE_MAC, MessageType.DISCOVER)).packet.yiaddr))
    assert ack.packet.message_type == MessageType.ACK
    clock.now += 301  # the flood's leases ran out: new clients are served again
    assert policy.answer(packet("52:54:00:00:07:01", MessageType.DISCOVER)) is not None


def test_a_request_flood_without_discover_is_limited_too(stores):
    registry, leases = stores
    policy = make_policy(registry, leases, subnet=Subnet(LOCAL.network, pool=POOL),
                         unknown_rate=5.0, unknown_burst=10)
    macs = random_macs(100)
    acked = 0
    for i, mac in enumerate(macs):
        reply = policy.answer(request_for(mac, f"198.18.0.{100 + i}"))
        acked += reply is not None and reply.packet.message_type == MessageType.ACK
    assert acked == 10


def test_relayed_packets_only_from_listed_relays(tmp_path):
    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    leases = LeaseStore(tmp_path / "leases.sqlite")
    relayed = Subnet("198.19.0.0/24", pool=("198.19.0.10", "198.19.0.200"))
    config = ServerConfig(state_dir=tmp_path, dhcp=DhcpConfig(
        mode=DhcpMode.FULL, subnet=Subnet("198.18.0.0/24"), relayed=(relayed,),
        relays=("198.18.0.2",)))
    policy = DhcpPolicy(config.dhcp, registry, leases, server_address=SERVER, http_base=HTTP,
                        tftp_enabled=True)
    service = DhcpService(config, registry, leases, policy)
    try:
        discover = codec.encode(DhcpPacket(op=1, xid=7, chaddr=bytes.fromhex("020000000001"),
                                           giaddr="198.19.0.1", options={53: b"\x01"}))
        assert service.handle_datagram(discover, ("198.18.0.66", 67), DHCP_PORT, None) is None
        assert service.unlisted_relay == 1 and service.answered == 0
        assert len(leases) == 0
        wire = service.handle_datagram(discover, ("198.18.0.2", 67), DHCP_PORT, None)
        assert codec.decode(wire).message_type == MessageType.OFFER
    finally:
        leases.close()
        registry.close()


def pxe_discover(mac):
    return packet(mac, MessageType.DISCOVER, BIOS_PXE)


def test_spoofed_pxe_flood_leaves_room_for_a_real_machine(stores, clock):
    registry, leases = stores
    registry.set_unknown_mac_policy(UnknownMacPolicy.DISCOVER)
    big = Subnet("198.18.0.0/19", pool=("198.18.1.0", "198.18.31.254"))  # room for all
    policy = make_policy(registry, leases, subnet=big,
                         pending_per_window=64, pending_window=60.0, unknown_rate=1e6,
                         unknown_burst=1e6)
    for mac in random_macs(MAX_PENDING):
        policy.answer(pxe_discover(mac))
    registry.flush()
    assert len(registry.list_nodes(state=NodeState.PENDING)) == 64
    real = "52:54:00:00:0b:01"
    # Within the window: not recorded, but still answered (an address, no boot file).
    offer = policy.answer(pxe_discover(real))
    assert offer is not None and codec.OPT_BOOTFILE not in offer.packet.options
    assert registry.lookup(real) is None
    clock.now += 61  # the next window: the machine, still asking, is recorded and booted
    offer = policy.answer(pxe_discover(real))
    assert offer.packet.options[codec.OPT_BOOTFILE] == b"undionly.kpxe"
    assert registry.lookup(real).state == NodeState.PENDING
    # The spoofed entries are never seen again and expire; the real one is seen again.
    clock.now += 3000
    policy.answer(pxe_discover(real))
    registry.flush()
    assert registry.purge_pending(3600) == []  # nobody is an hour old yet
    clock.now += 600
    removed = registry.purge_pending(3600)
    assert len(removed) == 64 and real not in removed
    assert [n.mac for n in registry.list_nodes(state=NodeState.PENDING)] == [real]


def test_full_pending_list_does_not_cost_the_answer(stores):
    """Today's code raised TooManyPending out of the policy: the client got nothing."""
    registry, leases = stores
    registry.set_unknown_mac_policy(UnknownMacPolicy.DISCOVER)
    policy = make_policy(registry, leases, subnet=Subnet(LOCAL.network, pool=POOL),
                         pending_per_window=10 * MAX_PENDING, unknown_rate=1e6,
                         unknown_burst=1e6, unknown_pool_share=1.0)
    for mac in random_macs(MAX_PENDING):
        registry.discover(mac, {})
    registry.flush()
    offer = policy.answer(pxe_discover("52:54:00:00:0b:02"))
    assert offer is not None and offer.packet.yiaddr != "0.0.0.0"


def test_purge_all_pending_keeps_registered_nodes(stores):
    registry, _ = stores
    for mac in random_macs(5):
        registry.discover(mac, {})
    assert len(registry.purge_pending()) == 5
    assert registry.lookup(NODE_MAC) is not None
    assert registry.list_nodes(state=NodeState.PENDING) == []


def test_token_buckets_are_bounded_and_refill(clock):
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock, limit=4)
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5
    assert buckets.take("a") and not buckets.take("a")
    for i in range(100):
        buckets.take(f"relay{i}")
    assert len(buckets) == 4 and buckets.refused == 2


def test_unknown_holders_count_expired_ones_out():
    holders = UnknownHolders(limit=2)
    holders.hold("a", 10.0)
    holders.hold("b", 20.0)
    assert holders.full(5.0)
    assert holders.count(15.0) == 1 and not holders.full(15.0)
    holders.hold("b", 30.0)  # renewed
    assert holders.count(25.0) == 1
    for i in range(1000):
        holders.hold("c", float(i))
    assert len(holders._heap) < 200


def test_window(clock):
    window = Window(2, 60.0, clock)
    assert [window.take() for _ in range(3)] == [True, True, False]
    clock.now += 60
    assert window.take()




@pytest.mark.parametrize(("dhcp", "message"), [
    ({"relayed": [{"network": "198.19.0.0/24"}]}, "relayed subnets need dhcp.relays"),
    ({"relays": ["198.19.0.300"]}, "is not an IPv4 address"),
    ({"unknown_lease_time": 30}, "unknown_lease_time must be between"),
    ({"unknown_lease_time": 7200}, "unknown_lease_time must be between"),
    ({"unknown_pool_share": 0}, "unknown_pool_share must be in"),
    ({"unknown_rate": 0}, "unknown_rate must be positive"),
    ({"pending_expiry": -1}, "pending_expiry must be positive"),
])
def test_guard_settings_are_checked(dhcp, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping({"dhcp": dhcp})


def test_guard_settings_from_toml():
    config = from_mapping({"dhcp": {"relays": ["198.19.0.1"], "unknown_lease_time": 600,
                                    "relayed": [{"network": "198.19.0.0/24"}]}})
    assert config.dhcp.relays == ("198.19.0.1",) and config.dhcp.unknown_lease_time == 600
