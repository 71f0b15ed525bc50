"""TFTP packets (RFC 1350, options RFC 2347): bytes <-> dataclasses, no I/O.

``parse`` turns one datagram into a packet dataclass or raises ``MalformedPacket``; each packet
type has an ``encode`` method. Option *negotiation* lives in ``options``; here options are just
the ordered name/value pairs of a request, names lower-cased (RFC 2347 makes them
case-insensitive).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from configserver.tftp.errors import MalformedPacket

# The largest datagram TFTP can produce: a DATA packet of blksize 65464 (RFC 2348).
MAX_DATAGRAM = 4 + 65464
DEFAULT_BLKSIZE = 512

_HEADER = struct.Struct("!HH")
_OPCODE = struct.Struct("!H")


class Opcode(enum.IntEnum):
    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6


class ErrorCode(enum.IntEnum):
    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8  # RFC 2347


class TransferMode(enum.StrEnum):
    OCTET = "octet"
    NETASCII = "netascii"
    MAIL = "mail"


@dataclass(frozen=True)
class Request:
    """A read or write request: file name, transfer mode and the options in request order."""

    filename: str
    mode: TransferMode
    options: tuple[tuple[str, str], ...] = ()

    opcode = Opcode.RRQ

    def encode(self) -> bytes:
        parts = [self.filename.encode("latin-1"), str(self.mode).encode("ascii")]
        for name, value in self.options:
            parts += [name.encode("latin-1"), value.encode("latin-1")]
        return _OPCODE.pack(self.opcode) + b"".join(p + b"\0" for p in parts)


@dataclass(frozen=True)
class ReadRequest(Request):
    opcode = Opcode.RRQ


@dataclass(frozen=True)
class WriteRequest(Request):
    opcode = Opcode.WRQ


@dataclass(frozen=True)
class Data:
    block: int
    payload: bytes

    def encode(self) -> bytes:
        return _HEADER.pack(Opcode.DATA, self.block) + self.payload


@dataclass(frozen=True)
class Ack:
    block: int

    def encode(self) -> bytes:
        return _HEADER.pack(Opcode.ACK, self.block)


@dataclass(frozen=True)
class Error:
    code: int
    message: str = ""

    def encode(self) -> bytes:
        text = self.message.encode("ascii", "replace").replace(b"\0", b"?")
        return _HEADER.pack(Opcode.ERROR, self.code) + text + b"\0"


@dataclass(frozen=True)
class OptionAck:
    options: tuple[tuple[str, str], ...] = field(default=())

    def encode(self) -> bytes:
        body = b"".join(n.encode("ascii") + b"\0" + v.encode("ascii") + b"\0"
                        for n, v in self.options)
        return _OPCODE.pack(Opcode.OACK) + body


Packet = ReadRequest | WriteRequest | Data | Ack | Error | OptionAck


def data_header(block: int) -> bytes:
    """The four header bytes of a DATA packet (the hot path builds packets from these)."""
    return _HEADER.pack(Opcode.DATA, block & 0xFFFF)


def parse(datagram: bytes) -> Packet:
    """Decode one TFTP datagram; raise ``MalformedPacket`` saying what is wrong."""
    if len(datagram) < 2:
        raise MalformedPacket("datagram shorter than an opcode")
    (opcode,) = _OPCODE.unpack_from(datagram)
    if opcode in (Opcode.RRQ, Opcode.WRQ):
        return _parse_request(opcode, datagram)
    if opcode in (Opcode.DATA, Opcode.ACK, Opcode.ERROR) and len(datagram) < 4:
        raise MalformedPacket(f"{Opcode(opcode).name} shorter than 4 bytes")
    if opcode == Opcode.DATA:
        return Data(_HEADER.unpack_from(datagram)[1], bytes(datagram[4:]))
    if opcode == Opcode.ACK:
        # Some clients pad ACKs; the block number is all that matters.
        return Ack(_HEADER.unpack_from(datagram)[1])
    if opcode == Opcode.ERROR:
        code = _HEADER.unpack_from(datagram)[1]
        text = bytes(datagram[4:]).split(b"\0", 1)[0]
        return Error(code, text.decode("latin-1"))
    if opcode == Opcode.OACK:
        fields = _strings(datagram[2:])
        if len(fields) % 2:
            raise MalformedPacket("OACK with an option name but no value")
        pairs = tuple((fields[i].lower(), fields[i + 1]) for i in range(0, len(fields), 2))
        return OptionAck(pairs)
    raise MalformedPacket(f"unknown opcode {opcode}")


def _strings(body: bytes) -> list[str]:
    """Split NUL-terminated strings; the last one must be terminated too."""
    if not body:
        return []
    if body[-1] != 0:
        raise MalformedPacket("request field not NUL-terminated")
    return [part.decode("latin-1") for part in bytes(body[:-1]).split(b"\0")]


def _parse_request(opcode: int, datagram: bytes) -> ReadRequest | WriteRequest:
    fields = _strings(datagram[2:])
    if len(fields) < 2:
        raise MalformedPacket("request without file name and mode")
    filename, mode_text = fields[0], fields[1].lower()
    if not filename:
        raise MalformedPacket("empty file name")
    try:
        mode = TransferMode(mode_text)
    except ValueError:
        raise MalformedPacket(f"unknown transfer mode {mode_text[:20]!r}") from None
    rest = fields[2:]
    # A trailing unpaired string (some clients pad with an extra NUL) is not an option.
    if len(rest) % 2:
        rest = rest[:-1]
    options = tuple((rest[i].lower(), rest[i + 1]) for i in range(0, len(rest), 2)
                    if rest[i])
    cls = ReadRequest if opcode == Opcode.RRQ else WriteRequest
    return cls(filename, mode, options)
