"""DHCPv4 wire format (RFC 2131, 2132, 3396): bytes <-> ``DhcpPacket``. Pure; no I/O.

``decode`` is strict: anything a well-behaved client would not send (truncation, an option running
past the end of its field, no END option, hlen 0 or > 16, a zero-length client identifier,
option 52 overload loops, an absurd number of options, a bad maximum message size, a hostname with
an embedded NUL) raises ``MalformedPacket`` so that the caller drops the datagram.
"""

from __future__ import annotations

import enum
import socket
import struct
from dataclasses import dataclass, field

from configserver.dhcp.errors import MalformedPacket

MAGIC_COOKIE = b"\x63\x82\x53\x63"
HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
HEADER_SIZE = HEADER.size  # 236
MIN_PACKET = HEADER_SIZE + len(MAGIC_COOKIE)
BOOTP_MIN_SIZE = 300  # RFC 1542: pad replies so that old relays and clients accept them
MAX_DATAGRAM = 4096
MAX_OPTIONS = 255
BROADCAST_FLAG = 0x8000
ZERO_IP = b"\0\0\0\0"

BOOTREQUEST = 1
BOOTREPLY = 2

# Option codes used by the server (RFC 2132 unless noted).
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN = 15
OPT_MTU = 26
OPT_BROADCAST = 28
OPT_VENDOR = 43
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAM_LIST = 55
OPT_MESSAGE = 56
OPT_MAX_SIZE = 57
OPT_RENEWAL_TIME = 58
OPT_REBINDING_TIME = 59
OPT_VENDOR_CLASS = 60
OPT_CLIENT_ID = 61
OPT_TFTP_SERVER = 66
OPT_BOOTFILE = 67
OPT_USER_CLASS = 77  # RFC 3004
OPT_RELAY_AGENT = 82  # RFC 3046
OPT_CLIENT_ARCH = 93  # RFC 4578
OPT_CLIENT_NDI = 94
OPT_CLIENT_UUID = 97
OPT_IPXE_ENCAP = 175  # iPXE's own encapsulated options
OPT_END = 255

# Options whose value must not be empty (RFC 2132 minimum lengths).
_MIN_LENGTH = {OPT_CLIENT_ID: 2, OPT_MESSAGE_TYPE: 1, OPT_REQUESTED_IP: 4, OPT_SERVER_ID: 4,
               OPT_MAX_SIZE: 2, OPT_OVERLOAD: 1, OPT_HOSTNAME: 1, OPT_CLIENT_ARCH: 2}


class MessageType(enum.IntEnum):
    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


@dataclass(slots=True)
class DhcpPacket:
    """One BOOTP/DHCP message. Addresses are dotted quads; options map code -> raw value.

    Repeated instances of one option code are concatenated (RFC 3396), so ``options`` holds
    each code once; ``encode`` splits values longer than 255 bytes again.
    """

    op: int
    xid: int
    chaddr: bytes
    htype: int = 1
    hops: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: str = "0.0.0.0"
    yiaddr: str = "0.0.0.0"
    siaddr: str = "0.0.0.0"
    giaddr: str = "0.0.0.0"
    sname: bytes = b""
    file: bytes = b""
    options: dict[int, bytes] = field(default_factory=dict)

    @property
    def message_type(self) -> MessageType | None:
        value = self.options.get(OPT_MESSAGE_TYPE)
        if value is None or len(value) != 1:
            return None
        try:
            return MessageType(value[0])
        except ValueError:
            return None

    @property
    def mac(self) -> str:
        """The client hardware address as ``aa:bb:...`` (chaddr is the client's identity)."""
        return self.chaddr.hex(":")

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & BROADCAST_FLAG)

    def ip_option(self, code: int) -> str | None:
        value = self.options.get(code)
        if value is None or len(value) != 4:
            return None
        return _ntoa(value)

    def text_option(self, code: int) -> str | None:
        value = self.options.get(code)
        return None if value is None else value.decode("ascii", "replace")


_ntoa = socket.inet_ntoa


def _aton(text: str) -> bytes:
    try:
        return socket.inet_aton(text) if text.count(".") == 3 else _bad_ip(text)
    except OSError as exc:
        raise ValueError(f"invalid IPv4 address {text!r}") from exc


def _bad_ip(text: str) -> bytes:
    raise ValueError(f"invalid IPv4 address {text!r}")


def ip_to_int(text: str) -> int:
    """A dotted quad as an integer (ValueError if it is not one)."""
    return int.from_bytes(_aton(text), "big")


def int_to_ip(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "big"))


def decode(data: bytes) -> DhcpPacket:
    """Parse one datagram; raise ``MalformedPacket`` (naming the defect) if it is not sane."""
    if len(data) < MIN_PACKET:
        raise MalformedPacket(f"truncated: {len(data)} bytes, need at least {MIN_PACKET}")
    if len(data) > MAX_DATAGRAM:
        raise MalformedPacket(f"oversized: {len(data)} bytes")
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr,
     sname, bootfile) = HEADER.unpack_from(data)
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise MalformedPacket(f"bad op {op}")
    if not 1 <= hlen <= 16:
        raise MalformedPacket(f"bad hlen {hlen}")
    if data[HEADER_SIZE:MIN_PACKET] != MAGIC_COOKIE:
        raise MalformedPacket("no DHCP magic cookie")
    options: dict[int, bytes] = {}
    count = _parse_options(data, MIN_PACKET, len(data), options, count=0, where="options")
    overload = options.get(OPT_OVERLOAD)
    if overload is not None:
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise MalformedPacket(f"bad option 52 overload value {overload.hex()}")
        # Options continue in the file field, then sname (RFC 2131 4.1). A second option 52 in
        # those fields would be a loop: _parse_options refuses it.
        if overload[0] & 1:
            count = _parse_options(bootfile, 0, len(bootfile), options, count=count,
                                   where="file")
            bootfile = b""
        if overload[0] & 2:
            _parse_options(sname, 0, len(sname), options, count=count, where="sname")
            sname = b""
        # A framing detail of this datagram, consumed here: re-encoding the packet must not
        # claim that its (now empty) file or sname fields hold options.
        del options[OPT_OVERLOAD]
    _check_options(options)
    return DhcpPacket(op=op, htype=htype, hops=hops, xid=xid, secs=secs, flags=flags,
                      ciaddr=_ntoa(ciaddr), yiaddr=_ntoa(yiaddr), siaddr=_ntoa(siaddr),
                      giaddr=_ntoa(giaddr), chaddr=chaddr[:hlen],
                      sname=sname.split(b"\0", 1)[0], file=bootfile.split(b"\0", 1)[0],
                      options=options)


def _parse_options(buf: bytes, pos: int, end: int, options: dict[int, bytes], *, count: int,
                   where: str) -> int:
    in_overload_field = where != "options"
    while pos < end:
        code = buf[pos]
        if code == OPT_PAD:
            pos += 1
            continue
        if code == OPT_END:
            return count
        if pos + 1 >= end:
            raise MalformedPacket(f"option {code} truncated in {where}")
        length = buf[pos + 1]
        start = pos + 2
        pos = start + length
        if pos > end:
            raise MalformedPacket(f"option {code} overruns the {where} field")
        if in_overload_field and code == OPT_OVERLOAD:
            raise MalformedPacket(f"option 52 inside the {where} field (overload loop)")
        count += 1
        if count > MAX_OPTIONS:
            raise MalformedPacket(f"more than {MAX_OPTIONS} options")
        value = buf[start:pos]
        previous = options.get(code)
        options[code] = value if previous is None else previous + value
    raise MalformedPacket(f"no END option in {where}")


def _check_options(options: dict[int, bytes]) -> None:
    for code in _MIN_LENGTH.keys() & options.keys():
        if len(options[code]) < _MIN_LENGTH[code]:
            raise MalformedPacket(f"option {code} too short ({len(options[code])} bytes)")
    size = options.get(OPT_MAX_SIZE)
    if size is not None and (len(size) != 2 or int.from_bytes(size, "big") < 576):
        raise MalformedPacket(f"option 57 maximum message size {size.hex()} below 576")
    hostname = options.get(OPT_HOSTNAME)
    if hostname is not None and b"\0" in hostname.rstrip(b"\0"):
        raise MalformedPacket("hostname option contains NUL")
    for code in (OPT_REQUESTED_IP, OPT_SERVER_ID):
        value = options.get(code)
        if value is not None and len(value) != 4:
            raise MalformedPacket(f"option {code} is not one IPv4 address")


def encode(packet: DhcpPacket, *, max_size: int = 1472) -> bytes:
    """Serialise a packet, END-terminated and padded to the BOOTP minimum of 300 bytes.

    Raises ``ValueError`` if the result would exceed ``max_size`` (the caller's bug).
    """
    chaddr = packet.chaddr[:16]
    header = HEADER.pack(
        packet.op, packet.htype, len(chaddr), packet.hops, packet.xid, packet.secs,
        packet.flags, _aton(packet.ciaddr), _aton(packet.yiaddr), _aton(packet.siaddr),
        _aton(packet.giaddr), chaddr, packet.sname[:63], packet.file[:127])
    parts = [header, MAGIC_COOKIE]
    options = packet.options
    # Message type first: some PXE ROMs look for it there.
    kind = options.get(OPT_MESSAGE_TYPE)
    if kind is not None:
        parts.append(bytes((OPT_MESSAGE_TYPE, len(kind))) + kind)
    for code, value in options.items():
        if code == OPT_MESSAGE_TYPE:
            continue
        if not 0 < code < OPT_END:
            raise ValueError(f"option code {code} cannot be encoded")
        if len(value) <= 255:
            parts.append(bytes((code, len(value))) + value)
            continue
        for offset in range(0, len(value), 255):
            chunk = value[offset:offset + 255]
            parts.append(bytes((code, len(chunk))) + chunk)
    parts.append(bytes((OPT_END,)))
    wire = b"".join(parts)
    if len(wire) < BOOTP_MIN_SIZE:
        wire += b"\0" * (BOOTP_MIN_SIZE - len(wire))
    if len(wire) > max_size:
        raise ValueError(f"DHCP reply of {len(wire)} bytes exceeds {max_size}")
    return wire


def max_reply_size(request: DhcpPacket, mtu_limit: int = 1472) -> int:
    """The largest reply the client accepts: option 57 (clamped to our limit), else 576."""
    value = request.options.get(OPT_MAX_SIZE)
    if value is None or len(value) != 2:
        return 576 - 28
    return max(576 - 28, min(int.from_bytes(value, "big") - 28, mtu_limit))
