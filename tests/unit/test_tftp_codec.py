"""TFTP codec and option negotiation, with property tests of parsing (hypothesis)."""

from __future__ import annotations

import pytest
from fuzzing import mutated
from hypothesis import event, given
from hypothesis import strategies as st

from configserver.tftp.codec import (
    Ack,
    Data,
    Error,
    ErrorCode,
    OptionAck,
    ReadRequest,
    TransferMode,
    WriteRequest,
    data_header,
    parse,
)
from configserver.tftp.errors import FileRefused, MalformedPacket
from configserver.tftp.files import ServedRoots
from configserver.tftp.options import negotiate


def test_read_request_from_tftp_hpa_with_options():
    # What `tftp -m binary` + blksize/tsize sends: opcode, name, mode, option pairs.
    datagram = b"\x00\x01undionly.kpxe\x00octet\x00tsize\x000\x00blksize\x001468\x00"
    packet = parse(datagram)
    assert packet == ReadRequest("undionly.kpxe", TransferMode.OCTET,
                                 (("tsize", "0"), ("blksize", "1468")))
    assert packet.encode() == datagram


def test_mode_and_option_names_are_case_insensitive():
    packet = parse(b"\x00\x01a\x00OcTeT\x00BLKSIZE\x001024\x00")
    assert packet.mode is TransferMode.OCTET
    assert packet.options == (("blksize", "1024"),)


def test_write_request_is_parsed_as_such():
    assert isinstance(parse(b"\x00\x02up.bin\x00octet\x00"), WriteRequest)


def test_trailing_padding_after_options_is_ignored():
    packet = parse(b"\x00\x01a\x00octet\x00tsize\x000\x00\x00")
    assert packet.options == (("tsize", "0"),)


@pytest.mark.parametrize("datagram, reason", [
    (b"", "shorter than an opcode"),
    (b"\x00", "shorter than an opcode"),
    (b"\x00\x01file\x00octet", "not NUL-terminated"),
    (b"\x00\x01file\x00", "without file name and mode"),
    (b"\x00\x01\x00octet\x00", "empty file name"),
    (b"\x00\x01file\x00binary\x00", "unknown transfer mode"),
    (b"\x00\x03\x00", "shorter than 4 bytes"),
    (b"\x00\x04\x00", "shorter than 4 bytes"),
    (b"\x00\x09\x00\x01", "unknown opcode"),
    (b"\x00\x06blksize\x00", "no value"),
])
def test_malformed_datagrams_are_rejected_with_a_reason(datagram, reason):
    with pytest.raises(MalformedPacket, match=reason):
        parse(datagram)


def test_data_ack_error_oack_round_trip():
    for packet in (Data(65535, b"x" * 512), Data(0, b""), Ack(0), Ack(65535),
                   Error(ErrorCode.UNKNOWN_TID, "unknown transfer ID"),
                   OptionAck((("blksize", "1468"), ("tsize", "99")))):
        assert parse(packet.encode()) == packet
    assert data_header(65536) == b"\x00\x03\x00\x00"  # block numbers roll over to 0


def test_error_message_cannot_smuggle_a_nul():
    assert Error(1, "a\0b").encode() == b"\x00\x05\x00\x01a?b\x00"


# -- negotiation ------------------------------------------------------------------------------

def test_no_options_means_no_oack_and_defaults():
    params = negotiate((), 1000)
    assert (params.blksize, params.windowsize, params.timeout, params.oack) == (512, 1, None, ())


def test_all_options_accepted_in_request_order():
    params = negotiate((("windowsize", "16"), ("tsize", "0"), ("blksize", "1468"),
                        ("timeout", "3")), 12345)
    assert params.oack == (("windowsize", "16"), ("tsize", "12345"), ("blksize", "1468"),
                           ("timeout", "3"))
    assert (params.blksize, params.windowsize, params.timeout) == (1468, 16, 3)


@pytest.mark.parametrize("options, blksize, windowsize, timeout, oack", [
    ((("blksize", "7"),), 512, 1, None, ()),                       # below RFC 2348 minimum
    ((("blksize", "8"),), 8, 1, None, (("blksize", "8"),)),
    ((("blksize", "65464"),), 65464, 1, None, (("blksize", "65464"),)),
    ((("blksize", "99999"),), 65464, 1, None, (("blksize", "65464"),)),  # lowered
    ((("blksize", "-5"),), 512, 1, None, ()),
    ((("blksize", "1e3"),), 512, 1, None, ()),
    ((("blksize", " 512"),), 512, 1, None, ()),
    ((("timeout", "0"),), 512, 1, None, ()),                       # RFC 2349: 1..255
    ((("timeout", "256"),), 512, 1, None, ()),
    ((("timeout", "255"),), 512, 1, 255, (("timeout", "255"),)),
    ((("windowsize", "0"),), 512, 1, None, ()),                    # RFC 7440: 1..65535
    ((("windowsize", "65536"),), 512, 65535, None, (("windowsize", "65535"),)),
    ((("tsize", "abc"),), 512, 1, None, ()),
    ((("multicast", ""), ("rollover", "0")), 512, 1, None, ()),   # unknown: ignored
    ((("blksize", "1024"), ("blksize", "2048")), 1024, 1, None, (("blksize", "1024"),)),
])
def test_out_of_range_and_malformed_values_are_declined(options, blksize, windowsize,
                                                        timeout, oack):
    params = negotiate(options, 0)
    assert (params.blksize, params.windowsize, params.timeout, params.oack) == (
        blksize, windowsize, timeout, oack)


def test_tsize_is_declined_for_an_empty_file_only():
    # curl aborts on "tsize 0" in an OACK; the empty DATA block says the same thing.
    assert negotiate((("tsize", "0"),), 0).oack == ()
    assert negotiate((("tsize", "0"), ("blksize", "512")), 0).oack == (("blksize", "512"),)
    assert negotiate((("tsize", "0"),), 1).oack == (("tsize", "1"),)


def test_server_limits_lower_blksize_and_windowsize():
    params = negotiate((("blksize", "9000"), ("windowsize", "1000")), 1,
                       max_blksize=1468, max_windowsize=64)
    assert params.oack == (("blksize", "1468"), ("windowsize", "64"))


@pytest.mark.parametrize("options, room, blksize, windowsize", [
    # The silent client of issue 13: 64 blocks of 65464 bytes, 16 fit in 1 MiB.
    ((("blksize", "65464"), ("windowsize", "64")), 1 << 20, 65464, 16),
    ((("blksize", "1468"), ("windowsize", "64")), 1 << 20, 1468, 64),   # fits as asked
    ((("windowsize", "8"),), 2000, 512, 3),
    ((("blksize", "65464"), ("windowsize", "4")), 1200, 1200, 1),      # one smaller block
    ((("blksize", "1468"),), 300, 512, 1),                             # not below 512...
    ((("blksize", "256"), ("windowsize", "4")), 300, 256, 1),          # ...unless asked
])
def test_the_window_is_lowered_to_the_bytes_in_flight_allowed(options, room, blksize,
                                                              windowsize):
    params = negotiate(options, 10 ** 9, max_window_bytes=room)
    assert (params.blksize, params.windowsize) == (blksize, windowsize)
    assert dict(params.oack) == {name: str(params.blksize if name == "blksize"
                                           else params.windowsize) for name, _ in options}


# -- property tests -----------------------------------------------------------------------

# Request fields are NUL-terminated latin-1 strings; option names are case-insensitive and
# parse lower-cases them.
_FIELD = st.text(st.characters(min_codepoint=1, max_codepoint=255), max_size=30)
_NAME = st.text(st.characters(min_codepoint=1, max_codepoint=255), min_size=1, max_size=12)
_OPTION_NAME = _NAME.map(str.lower).filter(lambda name: name == name.lower())
_OPTIONS = st.lists(st.tuples(_OPTION_NAME, _FIELD), max_size=6).map(tuple)
_ASCII = st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=30)
_BLOCK = st.integers(0, 65535)
PACKETS = st.one_of(
    st.builds(ReadRequest, _NAME, st.sampled_from(TransferMode), _OPTIONS),
    st.builds(WriteRequest, _NAME, st.sampled_from(TransferMode), _OPTIONS),
    st.builds(Data, _BLOCK, st.binary(max_size=1500)),
    st.builds(Ack, _BLOCK),
    st.builds(Error, _BLOCK, _ASCII),
    st.builds(OptionAck, st.lists(st.tuples(_ASCII.map(str.lower), _ASCII),
                                  max_size=6).map(tuple)),
)

_SEEDS = [
    b"\x00\x01undionly.kpxe\x00octet\x00",
    b"\x00\x01ipxe.efi\x00octet\x00tsize\x000\x00blksize\x001468\x00windowsize\x0016\x00",
    b"\x00\x01images/storage/vmlinuz\x00netascii\x00timeout\x005\x00",
    b"\x00\x02upload\x00octet\x00",
    b"\x00\x01../../etc/passwd\x00octet\x00",
    b"\x00\x04\x00\x07",
    b"\x00\x05\x00\x08refused\x00",
]
_TOKENS = [b"\x00", b"..", b"/", b"\\", b"blksize", b"tsize", b"windowsize", b"timeout",
           b"octet", b"netascii", b"mail", b"65464", b"0", b"99999999999999999999999", b"-1",
           b"\xff", b"%00", b"\x00\x01", b"\x00\x02"]
DATAGRAMS = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda opcode, body: bytes((0, opcode)) + body, st.integers(1, 6),
              st.binary(max_size=80)),
    mutated(st.sampled_from(_SEEDS) | PACKETS.map(lambda packet: packet.encode()),
            st.sampled_from(_TOKENS) | st.binary(min_size=1, max_size=16), max_edits=4),
)


@given(PACKETS)
def test_parse_reads_back_what_encode_wrote(packet):
    assert parse(packet.encode()) == packet


@given(DATAGRAMS)
def test_parse_raises_only_malformed_packet_and_what_it_accepts_is_sane(tmp_path_factory,
                                                                        datagram):
    """parse() returns a packet or raises MalformedPacket, nothing else; what it accepts is
    consistent (requests re-encode, negotiation stays in range, names never escape)."""
    try:
        packet = parse(datagram)
    except MalformedPacket:
        event("malformed")
        return
    event(type(packet).__name__)
    if isinstance(packet, ReadRequest | WriteRequest):
        assert parse(packet.encode()) == packet
        params = negotiate(packet.options, 1000)
        assert 8 <= params.blksize <= 65464
        assert 1 <= params.windowsize <= 65535
        assert params.timeout is None or 1 <= params.timeout <= 255
        root = tmp_path_factory.getbasetemp() / "tftp-root"
        root.mkdir(exist_ok=True)
        try:
            resolved = ServedRoots({"": root, "images/": root}).resolve(packet.filename)
        except FileRefused as exc:
            assert exc.tftp_code in (ErrorCode.FILE_NOT_FOUND, ErrorCode.ACCESS_VIOLATION)
        else:
            assert resolved.is_relative_to(root.resolve())
