"""DHCP codec: real captured requests, round trips, and the malformed inputs of issue 3."""

from __future__ import annotations

import pytest

from configserver.dhcp import codec
from configserver.dhcp.codec import DhcpPacket, MessageType
from configserver.dhcp.errors import MalformedPacket
from configserver.dhcp.options import BootStage, classify, user_classes

COOKIE = "63825363"
# op 1, htype 1, hlen 6, xid 1, no addresses, chaddr 0a:0b:0c:0d:0e:0f.
PLAIN_HEAD = "010106000000000100000000000000000000000000000000000000000a0b0c0d0e0f"


def captured(head: str, tail: str, total: int) -> bytes:
    """Rebuild a captured datagram: header start, zeros up to the cookie, options, padding."""
    head_bytes = bytes.fromhex(head)
    body = head_bytes + bytes(codec.HEADER_SIZE - len(head_bytes)) + bytes.fromhex(tail)
    return body + bytes(total - len(body))


# Captured on a veth pair (tests/netlab.py) from isc-dhcp-client 4.4.3-P1, udhcpc 1.35.0
# and perfdhcp (kea-admin 2.2) sending as a relay from 198.18.0.2.
DHCLIENT_DISCOVER = captured(
    "010106003ddd74780000000000000000000000000000000000000000525400123456",
    COOKIE + "3501010c02766d370d011c02030f06770c2c2f1a792aff", 300)
UDHCPC_DISCOVER = captured(
    "01010600a0ecd6100000000000000000000000000000000000000000525400123456",
    COOKIE + "3501013902024037070103060c0f1c2a3c0c756468637020312e33352e303d0701525400123456ff",
    300)
PERFDHCP_DISCOVER = captured(
    "010106010000000000000000000000000000000000000000c6120002000c01020304",
    COOKIE + "3501013707011c02030f060c3d0701000c01020304ff", 262)


def test_dhclient_discover_decodes():
    packet = codec.decode(DHCLIENT_DISCOVER)
    assert packet.op == codec.BOOTREQUEST
    assert packet.xid == 0x3DDD7478
    assert packet.mac == "52:54:00:12:34:56"
    assert packet.message_type == MessageType.DISCOVER
    assert packet.options[codec.OPT_HOSTNAME] == b"vm"
    assert codec.OPT_ROUTER in packet.options[codec.OPT_PARAM_LIST]
    assert classify(packet).stage == BootStage.NONE


def test_udhcpc_discover_decodes():
    packet = codec.decode(UDHCPC_DISCOVER)
    assert packet.mac == "52:54:00:12:34:56"
    assert packet.options[codec.OPT_MAX_SIZE] == (576).to_bytes(2, "big")
    assert packet.text_option(codec.OPT_VENDOR_CLASS) == "udhcp 1.35.0"
    assert packet.options[codec.OPT_CLIENT_ID] == bytes.fromhex("01525400123456")
    assert classify(packet).stage == BootStage.NONE


def test_perfdhcp_relayed_discover_decodes():
    packet = codec.decode(PERFDHCP_DISCOVER)
    assert packet.hops == 1
    assert packet.giaddr == "198.18.0.2"
    assert packet.mac == "00:0c:01:02:03:04"
    assert packet.message_type == MessageType.DISCOVER


@pytest.mark.parametrize("wire", [DHCLIENT_DISCOVER, UDHCPC_DISCOVER, PERFDHCP_DISCOVER],
                         ids=["dhclient", "udhcpc", "perfdhcp"])
def test_captured_round_trip(wire):
    packet = codec.decode(wire)
    again = codec.encode(packet)
    assert codec.decode(again) == packet
    # Same option bytes in the same order (message type first, as every client sends it).
    assert again.rstrip(b"\0") == wire.rstrip(b"\0")


def test_encode_splits_long_options_and_pads():
    packet = DhcpPacket(op=codec.BOOTREPLY, xid=7, chaddr=bytes(range(6)),
                        options={codec.OPT_MESSAGE_TYPE: bytes((MessageType.ACK,)),
                                 codec.OPT_BOOTFILE: b"x" * 600})
    wire = codec.encode(packet)
    assert len(wire) >= codec.BOOTP_MIN_SIZE
    assert codec.decode(wire).options[codec.OPT_BOOTFILE] == b"x" * 600
    assert wire[codec.MIN_PACKET:codec.MIN_PACKET + 3] == bytes((53, 1, 5))


def test_encode_refuses_oversized_reply():
    packet = DhcpPacket(op=codec.BOOTREPLY, xid=7, chaddr=bytes(6),
                        options={codec.OPT_VENDOR: b"v" * 2000})
    with pytest.raises(ValueError, match="exceeds"):
        codec.encode(packet, max_size=548)


def test_overload_reads_options_from_file_and_sname():
    tail = COOKIE + "350101" + "340103" + "ff"
    wire = bytearray(captured(PLAIN_HEAD, tail, 300))
    file_at = 44 + 64
    wire[file_at:file_at + 5] = bytes((12, 3)) + b"abc"
    wire[file_at + 5] = 255
    wire[44:44 + 4] = bytes((15, 2)) + b"lo"
    wire[48] = 255
    packet = codec.decode(bytes(wire))
    assert packet.options[codec.OPT_HOSTNAME] == b"abc"
    assert packet.options[codec.OPT_DOMAIN] == b"lo"
    assert packet.file == b"" and packet.sname == b""


def _with_options(tail_hex: str, *, head: str | None = None, total: int = 300) -> bytes:
    size = max(total, codec.HEADER_SIZE + len(tail_hex) // 2 + 4)
    return captured(head or PLAIN_HEAD, COOKIE + tail_hex, size)


HLEN_ZERO = "010100000000000100000000000000000000000000000000000000000a0b0c0d0e0f"
HLEN_17 = "010111000000000100000000000000000000000000000000000000000a0b0c0d0e0f"
BAD_INPUT = {
    "empty": b"",
    "truncated header": DHCLIENT_DISCOVER[:100],
    "truncated before cookie": DHCLIENT_DISCOVER[:238],
    "no cookie": DHCLIENT_DISCOVER[:236] + b"\0\0\0\0" + DHCLIENT_DISCOVER[240:],
    "option overruns packet": _with_options("350101" + "0c40" + "6162", total=0),
    "option length byte missing": _with_options("350101" + "0c", total=0),
    "no END option": _with_options("350101" + "0c026162", total=0),
    "hlen 0": _with_options("350101ff", head=HLEN_ZERO),
    "hlen 17": _with_options("350101ff", head=HLEN_17),
    "zero-length client id": _with_options("350101" + "3d00" + "ff"),
    "one-byte client id": _with_options("350101" + "3d0101" + "ff"),
    "option 52 loop": _with_options("350101" + "340101" + "ff"),
    "option 52 bad value": _with_options("350101" + "340109" + "ff"),
    "1000 options": _with_options("350101" + "0c0161" * 1000 + "ff"),
    "option 57 of 0": _with_options("350101" + "39020000" + "ff"),
    "option 57 of 1": _with_options("350101" + "39020001" + "ff"),
    "option 57 of one byte": _with_options("350101" + "390102" + "ff"),
    "hostname with NUL": _with_options("350101" + "0c0561620063" + "64" + "ff"),
    "requested ip of 3 bytes": _with_options("350101" + "3203c61200" + "ff"),
    "bad op": b"\x07" + DHCLIENT_DISCOVER[1:],
    "oversized": DHCLIENT_DISCOVER + bytes(5000),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_input_is_refused(name):
    with pytest.raises(MalformedPacket):
        codec.decode(BAD_INPUT[name])


def test_option_52_loop_detected_in_file_field():
    wire = bytearray(_with_options("350101" + "340101" + "ff"))
    file_at = 44 + 64
    wire[file_at:file_at + 4] = bytes((52, 1, 1, 255))
    with pytest.raises(MalformedPacket, match="loop"):
        codec.decode(bytes(wire))


def test_option_57_of_65535_is_clamped_not_trusted():
    packet = codec.decode(_with_options("350101" + "3902ffff" + "ff"))
    assert codec.max_reply_size(packet) == 1472
    small = codec.decode(_with_options("350101" + "39020240" + "ff"))
    assert codec.max_reply_size(small) == 548


def test_trailing_nul_in_hostname_is_tolerated():
    packet = codec.decode(_with_options("350101" + "0c03616200" + "ff"))
    assert packet.options[codec.OPT_HOSTNAME] == b"ab\0"


def test_user_class_forms():
    assert user_classes(b"iPXE") == ["iPXE"]
    assert user_classes(b"\x04iPXE\x03foo") == ["iPXE", "foo"]
    assert user_classes(b"\x09iPXE") == ["\tiPXE"]


@pytest.mark.parametrize(("options", "stage", "arch"), [
    ({60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\0\0"}, BootStage.FIRMWARE_PXE, 0),
    ({60: b"PXEClient:Arch:00007:UNDI:003016"}, BootStage.FIRMWARE_PXE, 7),
    ({60: b"PXEClient:Arch:00000:UNDI:002001", 77: b"iPXE", 93: b"\0\0"}, BootStage.IPXE, 0),
    ({60: b"PXEClient", 175: b"\x13\x01\x01"}, BootStage.IPXE, None),
    ({60: b"HTTPClient:Arch:00016:UNDI:003001", 93: b"\0\x10"}, BootStage.HTTP_BOOT, 16),
    ({60: b"udhcp 1.35.0"}, BootStage.NONE, None),
])
def test_classify(options, stage, arch):
    packet = DhcpPacket(op=1, xid=1, chaddr=bytes(6), options=options)
    client = classify(packet)
    assert client.stage == stage
    assert client.arch == arch


def test_overloaded_file_field_is_folded_in_and_the_overload_option_consumed():
    # Found by the property test: option 52 said "options continue in file"; decode folded
    # them in but kept option 52, so the re-encoded packet claimed options in an empty file.
    header = bytes([1, 1, 6, 0]) + bytes(24) + bytes(16) + bytes(64)
    bootfile = bytes([12, 2]) + b"n1" + bytes([255]) + bytes(123)
    data = header + bootfile + codec.MAGIC_COOKIE + bytes([52, 1, 1, 53, 1, 1, 255])
    packet = codec.decode(data)
    assert codec.OPT_OVERLOAD not in packet.options
    assert packet.options[12] == b"n1" and packet.file == b""
    assert codec.decode(codec.encode(packet, max_size=codec.MAX_DATAGRAM)) == packet
