"""DHCP service glue: reply routing (RFC 2131 4.1), bad input handling, lease lookups."""

from __future__ import annotations

import logging

import pytest
from test_dhcp_codec import BAD_INPUT, DHCLIENT_DISCOVER, PERFDHCP_DISCOVER

from configserver.config import DhcpConfig, DhcpMode, ServerConfig, Subnet
from configserver.dhcp import codec
from configserver.dhcp.codec import DhcpPacket, MessageType
from configserver.dhcp.leases import LeaseStore
from configserver.dhcp.policy import DHCP_PORT, PROXY_PORT, DhcpPolicy
from configserver.dhcp.service import DhcpService, destination, start_dhcp
from configserver.model import NodeSpec
from configserver.registry.sqlite import SqliteRegistry

SERVER = "198.18.0.1"


class FakeEndpoint:
    name = DHCP_PORT

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def send(self, data, addr):
        self.sent.append((data, addr))


@pytest.fixture
def service(tmp_path):
    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    registry.add_node(NodeSpec(mac="52:54:00:00:00:01", role="storage", ip="198.18.0.50"))
    subnet = Subnet("198.18.0.0/24", pool=("198.18.0.100", "198.18.0.200"))
    config = ServerConfig(state_dir=tmp_path, interface="eth0", dhcp=DhcpConfig(
        mode=DhcpMode.FULL, subnet=subnet, relays=("198.18.0.2", "198.20.0.1")))
    leases = LeaseStore(tmp_path / "leases.sqlite")
    policy = DhcpPolicy(config.dhcp, registry, leases, server_address=SERVER,
                        http_base="http://198.18.0.1:8080", tftp_enabled=True)
    yield DhcpService(config, registry, leases, policy)
    leases.close()
    registry.close()


def reply(kind=MessageType.ACK):
    return DhcpPacket(op=2, xid=1, chaddr=bytes(6), options={53: bytes((kind,))})


def request(**fields):
    return DhcpPacket(op=1, xid=1, chaddr=bytes(6), **fields)


@pytest.mark.parametrize(("req", "kind", "source", "port", "expected"), [
    (request(giaddr="198.19.0.1"), MessageType.OFFER, ("198.19.0.1", 67), DHCP_PORT,
     ("198.19.0.1", 67)),
    (request(giaddr="198.19.0.1"), MessageType.OFFER, ("198.18.0.2", 1067), DHCP_PORT,
     ("198.19.0.1", 67)),
    (request(giaddr="198.19.0.1"), MessageType.OFFER, ("198.19.0.1", 2067), DHCP_PORT,
     ("198.19.0.1", 2067)),
    (request(ciaddr="198.18.0.9"), MessageType.ACK, ("198.18.0.9", 68), DHCP_PORT,
     ("198.18.0.9", 68)),
    (request(ciaddr="198.18.0.9"), MessageType.NAK, ("198.18.0.9", 68), DHCP_PORT,
     ("255.255.255.255", 68)),
    (request(), MessageType.OFFER, ("0.0.0.0", 68), DHCP_PORT, ("255.255.255.255", 68)),
    (request(ciaddr="198.18.0.9"), MessageType.ACK, ("198.18.0.9", 68), PROXY_PORT,
     ("198.18.0.9", 68)),
])
def test_destination(req, kind, source, port, expected):
    assert destination(req, reply(kind), source, port, client_port=68,
                       relay_port=67) == expected


def test_bad_input_is_dropped_and_logged_rate_limited_and_good_input_answered(service, caplog):
    caplog.set_level(logging.WARNING)
    endpoint = FakeEndpoint()
    assert len(BAD_INPUT) > 10
    for data in BAD_INPUT.values():
        assert service.handle_datagram(data, ("198.18.0.66", 68), DHCP_PORT, endpoint) is None
    assert service.dropped == len(BAD_INPUT)
    # One budget of 10 lines per 10 s, however many sources send garbage.
    assert caplog.text.count("dropped malformed DHCP datagram") == 10
    wire = service.handle_datagram(DHCLIENT_DISCOVER, ("0.0.0.0", 68), DHCP_PORT, endpoint)
    assert wire is not None and codec.decode(wire).message_type == MessageType.OFFER
    assert endpoint.sent == [(wire, ("255.255.255.255", 68))]


def test_relayed_request_outside_our_subnets_is_silently_ignored(service):
    endpoint = FakeEndpoint()
    assert service.handle_datagram(PERFDHCP_DISCOVER, ("198.18.0.2", 67), DHCP_PORT,
                                   endpoint) is not None
    packet = codec.decode(PERFDHCP_DISCOVER)
    packet.giaddr = "198.20.0.1"
    assert service.handle_datagram(codec.encode(packet), ("198.20.0.1", 67), DHCP_PORT,
                                   endpoint) is None


def test_mac_for_ip(service):
    service.leases.bind("52:54:00:00:00:07", "198.18.0.107", 600)
    assert service.mac_for_ip("198.18.0.107") == "52:54:00:00:00:07"
    assert service.mac_for_ip("198.18.0.50") == "52:54:00:00:00:01"  # reservation
    assert service.mac_for_ip("198.18.0.250") is None
    inform = DhcpPacket(op=1, xid=9, chaddr=bytes.fromhex("525400000008"), ciaddr="198.18.0.9",
                        options={53: bytes((MessageType.INFORM,))})
    service.handle_datagram(codec.encode(inform), ("198.18.0.9", 68), DHCP_PORT, None)
    assert service.mac_for_ip("198.18.0.9") == "52:54:00:00:00:08"


async def test_start_dhcp_off_mode_opens_no_socket(tmp_path):
    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    config = ServerConfig(state_dir=tmp_path, dhcp=DhcpConfig(mode=DhcpMode.OFF))
    service = await start_dhcp(config, registry, server_address=SERVER,
                               http_base="http://198.18.0.1:8080", tftp_enabled=True)
    assert service.sockets == []
    assert (tmp_path / "leases.sqlite").exists()
    await service.close()
    registry.close()
