"""Property test: 100,000 random and mutated datagrams through the parser, the policy and the
encoder; nothing may escape but ``MalformedPacket`` from the parser, and the server must still
answer a good request afterwards.
"""

from __future__ import annotations

import random

from test_dhcp_codec import DHCLIENT_DISCOVER, PERFDHCP_DISCOVER, UDHCPC_DISCOVER

from configserver.config import DhcpConfig, DhcpMode, ServerConfig, Subnet
from configserver.dhcp import codec
from configserver.dhcp.codec import DhcpPacket, MessageType
from configserver.dhcp.errors import MalformedPacket
from configserver.dhcp.leases import LeaseStore
from configserver.dhcp.policy import DHCP_PORT, PROXY_PORT, DhcpPolicy
from configserver.dhcp.service import DhcpService
from configserver.model import NodeSpec, UnknownMacPolicy
from configserver.registry.sqlite import SqliteRegistry

DATAGRAMS = 100_000
SEED = 20261122
NODE_MAC = bytes.fromhex("525400000001")


def pxe_seeds() -> list[bytes]:
    seeds = [DHCLIENT_DISCOVER, UDHCPC_DISCOVER, PERFDHCP_DISCOVER]
    for kind in MessageType:
        for options in ({60: b"PXEClient:Arch:00007:UNDI:003016", 93: b"\0\x07"},
                        {60: b"PXEClient", 77: b"iPXE", 175: b"\x13\x01\x01"},
                        {60: b"HTTPClient:Arch:00016", 93: b"\0\x10", 61: b"\x01abcdef"},
                        {50: bytes((198, 18, 0, 50)), 54: bytes((198, 18, 0, 1)),
                         57: b"\xff\xff", 82: b"\x01\x02ab", 52: b"\x03"}):
            packet = DhcpPacket(op=1, xid=7, chaddr=NODE_MAC, ciaddr="198.18.0.50",
                                options={53: bytes((kind,)), **options})
            if 52 in options:
                packet.giaddr = "198.19.0.1"
            seeds.append(codec.encode(packet))
    return seeds


def mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 8)):
        choice = rng.random()
        pos = rng.randrange(len(data)) if data else 0
        if choice < 0.35 and data:
            data[pos] = rng.randrange(256)
        elif choice < 0.5:
            # Poke into the options area, where the interesting bugs live.
            at = rng.randrange(codec.MIN_PACKET, max(codec.MIN_PACKET + 1, len(data)))
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        elif choice < 0.65:
            del data[pos:pos + rng.randint(1, 40)]
        elif choice < 0.75:
            del data[rng.randrange(min(len(data), codec.MIN_PACKET - 4), len(data) + 1):]
        elif choice < 0.85 and len(data) > 2:
            data[2] = rng.choice((0, 1, 6, 16, 17, 255))  # hlen
        else:
            code = rng.choice((12, 50, 52, 53, 54, 57, 60, 61, 77, 82, 93, 175, 255, 0))
            value = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 2, 4, 9))))
            at = rng.randrange(codec.MIN_PACKET, max(codec.MIN_PACKET + 1, len(data)))
            data[at:at] = bytes((code, len(value))) + value
    return bytes(data)


def test_random_and_mutated_datagrams_never_escape(tmp_path):
    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    registry.add_node(NodeSpec(mac="52:54:00:00:00:01", role="storage", hostname="n1",
                               ip="198.18.0.50"))
    registry.set_unknown_mac_policy(UnknownMacPolicy.DISCOVER)
    leases = LeaseStore(tmp_path / "leases.sqlite", synchronous="OFF")
    results = {}
    for mode in (DhcpMode.FULL, DhcpMode.PROXY):
        config = ServerConfig(state_dir=tmp_path, dhcp=DhcpConfig(
            mode=mode, subnet=Subnet("198.18.0.0/24", pool=("198.18.0.100", "198.18.0.250")),
            relayed=(Subnet("198.19.0.0/24", pool=("198.19.0.10", "198.19.0.20")),)))
        policy = DhcpPolicy(config.dhcp, registry, leases, server_address="198.18.0.1",
                            http_base="http://198.18.0.1:8080", tftp_enabled=True)
        service = DhcpService(config, registry, leases, policy)
        service.bad_input.interval = 1e9  # one log line per kind of error is plenty here
        rng = random.Random(SEED + len(results))
        seeds = pxe_seeds()
        parsed = answered = 0
        for i in range(DATAGRAMS // 2):
            if i % 10 == 0:
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 600)))
            else:
                data = mutate(rng, rng.choice(seeds))
            try:
                codec.decode(data)
                parsed += 1
            except MalformedPacket:
                pass
            port = PROXY_PORT if i % 7 == 0 else DHCP_PORT
            # Anything but a clean drop or answer raises out of here and fails the test.
            if service.handle_datagram(data, ("198.18.0.66", 68), port, None) is not None:
                answered += 1
        # The service catches errors raised while answering (to keep serving): there must
        # have been none.
        assert service.failed == 0
        good = service.handle_datagram(pxe_seeds()[3], ("0.0.0.0", 68), DHCP_PORT, None)
        assert good is not None
        results[mode] = (parsed, answered)
    # The mutations must reach the policy, not only the parser's error paths.
    for mode, (parsed, answered) in results.items():
        assert parsed > DATAGRAMS // 20, mode
        assert answered > (DATAGRAMS // 100 if mode == DhcpMode.FULL else 200), mode
    leases.close()
    registry.close()
