"""Property tests of the DHCP codec and service (hypothesis).

What ``encode`` writes, ``decode`` reads back unchanged; ``decode`` raises nothing but
``MalformedPacket`` on any datagram (random or mutated from real and generated ones); the
service answers or drops every datagram without raising, and answers every DISCOVER of a
registered node.
"""

from __future__ import annotations

import pytest
from fuzzing import mutated, scaled
from hypothesis import event, given, settings
from hypothesis import strategies as st
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

NODE_MAC = bytes.fromhex("525400000001")
NODE_IP = "198.18.0.50"

# -- strategies ---------------------------------------------------------------------------

ADDRESSES = st.ip_addresses(v=4).map(str)
# Options that decode checks, each with values it accepts.
CHECKED_OPTIONS = {
    codec.OPT_MESSAGE_TYPE: st.integers(1, 8).map(lambda kind: bytes((kind,))),
    codec.OPT_REQUESTED_IP: st.binary(min_size=4, max_size=4),
    codec.OPT_SERVER_ID: st.binary(min_size=4, max_size=4),
    codec.OPT_MAX_SIZE: st.integers(576, 65535).map(lambda size: size.to_bytes(2, "big")),
    codec.OPT_CLIENT_ID: st.binary(min_size=2, max_size=20),
    codec.OPT_CLIENT_ARCH: st.binary(min_size=2, max_size=4),
    codec.OPT_HOSTNAME: st.binary(min_size=1, max_size=40).map(
        lambda name: name.replace(b"\0", b"-")),
}
# Any other code carries any value, even one longer than 255 bytes (split, then joined again).
OTHER_CODES = st.integers(1, 254).filter(
    lambda code: code not in CHECKED_OPTIONS and code != codec.OPT_OVERLOAD)
# What PXE firmware, iPXE and UEFI HTTP boot put in their requests.
BOOT_OPTIONS = st.sampled_from([
    {},
    {60: b"PXEClient:Arch:00007:UNDI:003016", 93: b"\0\x07"},
    {60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\0\0"},
    {60: b"PXEClient", 77: b"iPXE", 175: b"\x13\x01\x01"},
    {60: b"HTTPClient:Arch:00016", 93: b"\0\x10", 61: b"\x01abcdef"},
    {60: b"udhcp 1.35.0"},
])


def no_nul(size: int) -> st.SearchStrategy[bytes]:
    # sname and file are NUL-terminated strings on the wire.
    return st.binary(max_size=size).map(lambda value: value.replace(b"\0", b""))


@st.composite
def options(draw) -> dict[int, bytes]:
    chosen = draw(st.fixed_dictionaries({}, optional=CHECKED_OPTIONS))
    chosen.update(draw(st.dictionaries(OTHER_CODES, st.binary(max_size=300), max_size=8)))
    return chosen


PACKETS = st.builds(
    DhcpPacket, op=st.sampled_from((codec.BOOTREQUEST, codec.BOOTREPLY)),
    xid=st.integers(0, 2**32 - 1), chaddr=st.binary(min_size=1, max_size=16),
    htype=st.integers(0, 255), hops=st.integers(0, 255), secs=st.integers(0, 65535),
    flags=st.integers(0, 65535), ciaddr=ADDRESSES, yiaddr=ADDRESSES, siaddr=ADDRESSES,
    giaddr=ADDRESSES, sname=no_nul(63), file=no_nul(127), options=options())


@st.composite
def requests(draw, *, mac: bytes | None = None,
             kinds=tuple(MessageType)) -> DhcpPacket:
    """A client's request as PXE ROMs, iPXE and OS clients send them (local or relayed)."""
    kind = draw(st.sampled_from(kinds))
    chosen = {codec.OPT_MESSAGE_TYPE: bytes((kind,)), **draw(BOOT_OPTIONS)}
    chosen.update(draw(st.fixed_dictionaries({}, optional={
        codec.OPT_REQUESTED_IP: st.sampled_from((NODE_IP, "198.18.0.120", "10.0.0.1")),
        codec.OPT_SERVER_ID: st.sampled_from(("198.18.0.1", "198.18.0.2")),
        codec.OPT_MAX_SIZE: st.integers(576, 1500).map(lambda size: size.to_bytes(2, "big")),
        codec.OPT_PARAM_LIST: st.binary(max_size=20)})))
    for code in (codec.OPT_REQUESTED_IP, codec.OPT_SERVER_ID):
        if code in chosen:
            chosen[code] = bytes(int(part) for part in chosen[code].split("."))
    return DhcpPacket(op=codec.BOOTREQUEST, xid=draw(st.integers(0, 2**32 - 1)),
                      chaddr=mac or draw(st.binary(min_size=6, max_size=6)),
                      flags=draw(st.sampled_from((0, codec.BROADCAST_FLAG))),
                      ciaddr=draw(st.sampled_from(("0.0.0.0", NODE_IP))),
                      giaddr=draw(st.sampled_from(("0.0.0.0", "198.19.0.1", "203.0.113.1"))),
                      options=chosen)


SEEDS = (st.sampled_from([DHCLIENT_DISCOVER, UDHCPC_DISCOVER, PERFDHCP_DISCOVER])
         | requests().map(codec.encode) | requests(mac=NODE_MAC).map(codec.encode))
OPTION_INSERTS = st.builds(
    lambda code, value: bytes((code, len(value))) + value,
    st.sampled_from((0, 12, 50, 52, 53, 54, 57, 60, 61, 77, 82, 93, 175, 255)),
    st.binary(max_size=9))
# Pieces of an options field: options (of any length), PAD, END, overload, a code without
# its length, a length running past its value.
PIECES = st.one_of(
    OPTION_INSERTS,
    st.sampled_from([b"\0", b"\xff", b"\x34\x01\x01", b"\x34\x01\x02", b"\x34\x01\x03"]),
    st.integers(1, 254).map(lambda code: bytes((code,))),
    st.builds(lambda code, length, value: bytes((code, length)) + value,
              st.integers(1, 254), st.integers(0, 255), st.binary(max_size=8)),
)


@st.composite
def ragged(draw) -> bytes:
    """A request's header, then options fields put together from PIECES: the file and sname
    fields (where option 52 continues the options) too, sometimes."""
    head = bytearray(codec.encode(draw(requests()))[:codec.MIN_PACKET])
    for start, size in ((44, 64), (108, 128)):  # sname, file
        if draw(st.booleans()):
            field = b"".join(draw(st.lists(PIECES, max_size=6)))[:size]
            head[start:start + len(field)] = field
    return bytes(head) + b"".join(draw(st.lists(PIECES, max_size=12)))


DATAGRAMS = st.one_of(
    st.binary(max_size=600), ragged(),
    mutated(SEEDS, st.binary(min_size=1, max_size=6) | OPTION_INSERTS, focus=codec.MIN_PACKET))

# -- codec --------------------------------------------------------------------------------


@given(PACKETS)
def test_decode_reads_back_what_encode_wrote(packet):
    assert codec.decode(codec.encode(packet, max_size=codec.MAX_DATAGRAM)) == packet


@given(DATAGRAMS)
def test_decode_raises_only_malformed_packet(data):
    try:
        packet = codec.decode(data)
    except MalformedPacket:
        event("malformed")
        return
    event("decoded")  # --hypothesis-show-statistics shows how many get past the checks
    # What decode accepts, encode writes back and decode reads the same again.
    again = codec.encode(packet, max_size=2 * codec.MAX_DATAGRAM)
    if len(again) <= codec.MAX_DATAGRAM:
        assert codec.decode(again) == packet


# -- service ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    state = tmp_path_factory.mktemp("dhcp-fuzz")
    registry = SqliteRegistry(state / "registry.sqlite")
    registry.add_node(NodeSpec(mac="52:54:00:00:00:01", role="storage", hostname="n1",
                               ip=NODE_IP))
    registry.set_unknown_mac_policy(UnknownMacPolicy.DISCOVER)
    leases = LeaseStore(state / "leases.sqlite", synchronous="OFF")
    yield state, registry, leases
    leases.close()
    registry.close()


@pytest.fixture(scope="module", params=[DhcpMode.FULL, DhcpMode.PROXY],
                ids=lambda mode: mode.value)
def service(request, stores):
    state, registry, leases = stores
    config = ServerConfig(state_dir=state, dhcp=DhcpConfig(
        mode=request.param,
        subnet=Subnet("198.18.0.0/24", pool=("198.18.0.100", "198.18.0.250")),
        relayed=(Subnet("198.19.0.0/24", pool=("198.19.0.10", "198.19.0.20")),),
        relays=("198.18.0.66",)))
    policy = DhcpPolicy(config.dhcp, registry, leases, server_address="198.18.0.1",
                        http_base="http://198.18.0.1:8080", tftp_enabled=True)
    service = DhcpService(config, registry, leases, policy)
    service.bad_input.interval = 1e9  # one log line per kind of error is plenty here
    return service


@given(data=DATAGRAMS, port=st.sampled_from((DHCP_PORT, PROXY_PORT)))
@settings(max_examples=scaled(1.0))
def test_service_answers_or_drops_any_datagram(service, data, port):
    # Anything but a clean drop or answer raises out of here and fails the test.
    wire = service.handle_datagram(data, ("198.18.0.66", 68), port, None)
    # The service catches what answering raises, to keep serving: there must be none.
    assert service.failed == 0
    event("answered" if wire is not None else "dropped")
    if wire is not None:
        reply = codec.decode(wire)
        assert reply.op == codec.BOOTREPLY and reply.xid == codec.decode(data).xid


@given(requests(mac=NODE_MAC, kinds=(MessageType.DISCOVER,)))
def test_every_discover_of_a_registered_node_is_answered(service, request):
    wire = service.handle_datagram(codec.encode(request), ("198.18.0.66", 68), DHCP_PORT, None)
    assert service.failed == 0
    vendor = request.options.get(codec.OPT_VENDOR_CLASS, b"")
    if service.config.dhcp.mode == DhcpMode.PROXY:
        # ProxyDHCP adds boot information for boot clients only, and no address.
        if not vendor.startswith((b"PXEClient", b"HTTPClient")):
            return
        reply = codec.decode(wire)
        assert reply.message_type == MessageType.OFFER and reply.yiaddr == "0.0.0.0"
    elif request.giaddr == "0.0.0.0":
        reply = codec.decode(wire)
        assert reply.message_type == MessageType.OFFER and reply.yiaddr == NODE_IP
    elif request.giaddr == "198.19.0.1":
        # Relayed from a subnet the reservation is not in: an address from that pool.
        reply = codec.decode(wire)
        assert reply.message_type == MessageType.OFFER and reply.yiaddr.startswith("198.19.0.")
    else:
        assert wire is None  # relayed from a subnet we do not serve
