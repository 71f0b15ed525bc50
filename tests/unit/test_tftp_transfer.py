"""The read-transfer state machine, driven by a fake clock and a simulated client."""

from __future__ import annotations

import itertools
import os

import pytest

from configserver.tftp.codec import Data, Error, OptionAck, parse
from configserver.tftp.netascii import NetasciiReader, to_netascii
from configserver.tftp.options import TransferParameters, negotiate
from configserver.tftp.transfer import Phase, RetransmitPolicy, TftpTransfer


def _transfer(content: bytes, params: TransferParameters | None = None, *,
              policy: RetransmitPolicy | None = None) -> TftpTransfer:
    return TftpTransfer(len(content), params or TransferParameters(),
                        lambda off, n: content[off:off + n],
                        policy=policy or RetransmitPolicy(), now=0.0)


def _blocks(datagrams: list[bytes]) -> list[Data]:
    packets = [parse(d) for d in datagrams]
    assert all(isinstance(p, Data) for p in packets), packets
    return packets


def _run_lockstep_client(transfer: TftpTransfer) -> tuple[bytes, int]:
    """A perfect client: ACKs the last block of each window; returns file and packet count."""
    received, now, packets = bytearray(), 0.0, 0
    out = transfer.start(now)
    if out and parse(out[0]).__class__ is OptionAck:
        out = transfer.on_ack(0, now)
    while out:
        blocks = _blocks(out)
        packets += len(blocks)
        for block in blocks:
            received += block.payload
        now += 0.001
        out = transfer.on_ack(blocks[-1].block, now)
    return bytes(received), packets


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 1024, 1536, 5000])
def test_boundary_sizes_end_with_a_short_block(size):
    content = os.urandom(size)
    transfer = _transfer(content)
    received, packets = _run_lockstep_client(transfer)
    assert received == content
    assert packets == size // 512 + 1  # exact multiples end with an empty block
    assert transfer.phase is Phase.DONE and transfer.bytes_acknowledged == size


@pytest.mark.parametrize("windowsize", [1, 3, 16])
@pytest.mark.parametrize("size", [0, 100, 1024, 4096, 10_000])
def test_windows_carry_the_whole_file(size, windowsize):
    content = os.urandom(size)
    params = negotiate((("blksize", "64"), ("windowsize", str(windowsize))), size)
    transfer = _transfer(content, params)
    assert parse(transfer.start(0.0)[0]) == OptionAck(params.oack)
    received, _ = _run_lockstep_client(transfer)
    assert received == content and transfer.finished_ok


def test_block_numbers_roll_over_after_65535():
    content = os.urandom(8 * 70_000 + 3)
    transfer = _transfer(content, negotiate((("blksize", "8"), ("windowsize", "64")),
                                            len(content)))
    seen_zero_after_wrap = False
    out = transfer.on_ack(0, 0.0) if transfer.start(0.0) else []
    received = bytearray()
    while out:
        blocks = _blocks(out)
        for block in blocks:
            received += block.payload
            seen_zero_after_wrap |= block.block == 0
        out = transfer.on_ack(blocks[-1].block, 0.0)
    assert seen_zero_after_wrap
    assert bytes(received) == content and transfer.finished_ok


def test_duplicate_ack_does_not_resend():
    """Sorcerer's Apprentice: a delayed duplicate ACK must not make the server send twice."""
    transfer = _transfer(os.urandom(2000))
    assert _blocks(transfer.start(0.0))[0].block == 1
    assert _blocks(transfer.on_ack(1, 0.01))[0].block == 2
    assert transfer.on_ack(1, 0.02) == []          # the duplicate of ACK 1
    assert _blocks(transfer.on_ack(2, 0.03))[0].block == 3
    assert transfer.on_ack(2, 0.04) == [] and transfer.on_ack(1, 0.05) == []


def test_ack_for_a_block_never_sent_is_ignored():
    transfer = _transfer(os.urandom(5000))
    transfer.start(0.0)
    assert transfer.on_ack(7, 0.01) == []
    assert transfer.base == 1


def test_timeout_retransmits_the_window_then_gives_up():
    policy = RetransmitPolicy(initial=0.5, minimum=0.1, maximum=2.0, retries=3,
                              give_up_after=4.0)
    transfer = _transfer(os.urandom(3000), negotiate((("windowsize", "2"),), 3000),
                         policy=policy)
    transfer.start(0.0)
    assert transfer.deadline == 0.5
    assert transfer.on_timeout(0.4) == []           # not yet due
    first = _blocks(transfer.on_ack(0, 0.0))
    assert [b.block for b in first] == [1, 2]
    deadline = transfer.deadline
    resent = _blocks(transfer.on_timeout(deadline))
    assert [b.block for b in resent] == [1, 2]      # the whole window again
    assert transfer.retransmissions == 1
    assert transfer.deadline - deadline > transfer.rto / 2  # backed off
    now = transfer.deadline
    while transfer.active:
        out = transfer.on_timeout(now)
        now = transfer.deadline if transfer.deadline else now
    assert transfer.phase is Phase.FAILED and "stopped answering" in transfer.failure
    assert isinstance(parse(out[0]), Error)


def test_partial_window_ack_resends_from_the_gap():
    transfer = _transfer(os.urandom(64 * 10), negotiate((("blksize", "64"),
                                                         ("windowsize", "4")), 640))
    transfer.start(0.0)
    assert [b.block for b in _blocks(transfer.on_ack(0, 0.0))] == [1, 2, 3, 4]
    # Block 3 was lost: the client acknowledges 2 and the next window starts at 3.
    assert [b.block for b in _blocks(transfer.on_ack(2, 0.01))] == [3, 4, 5, 6]


def test_oack_retransmitted_until_acknowledged_and_error_8_aborts():
    transfer = _transfer(b"x" * 10, negotiate((("tsize", "0"),), 10))
    oack = transfer.start(0.0)
    assert transfer.on_ack(1, 0.1) == []            # only ACK 0 answers an OACK
    assert transfer.on_timeout(transfer.deadline) == oack
    transfer.on_error(8, "option refused", 1.0)
    assert transfer.phase is Phase.FAILED and "client error 8" in transfer.failure


def test_round_trip_time_adapts_the_timeout_but_client_timeout_is_fixed():
    policy = RetransmitPolicy(initial=1.0, minimum=0.02, maximum=1.0)
    adaptive = _transfer(os.urandom(512 * 20), policy=policy)
    adaptive.start(0.0)
    now = 0.0
    for block in range(1, 10):
        now += 0.001
        adaptive.on_ack(block, now)
    assert adaptive.rto == pytest.approx(0.02)
    fixed = _transfer(os.urandom(512 * 20), negotiate((("timeout", "3"),), 0), policy=policy)
    fixed.start(0.0)
    fixed.on_ack(0, 0.001)
    fixed.on_ack(1, 0.002)
    assert fixed.rto == 3.0 and fixed.deadline == pytest.approx(3.002)
    # The round trip is still measured (it decides whether the server polls for ACKs).
    assert adaptive.srtt == pytest.approx(0.001) and fixed.srtt == pytest.approx(0.001)


def test_lost_ack_is_repaired_by_the_timer_only():
    transfer = _transfer(os.urandom(1500))
    transfer.start(0.0)
    transfer.on_ack(1, 0.01)                        # block 2 sent; its ACK gets lost
    resent = _blocks(transfer.on_timeout(transfer.deadline))
    assert [b.block for b in resent] == [2]
    assert transfer.on_ack(1, 2.0) == []            # a stale ACK changes nothing
    assert [b.block for b in _blocks(transfer.on_ack(2, 2.1))] == [3]


def test_a_file_shrinking_under_a_transfer_is_a_read_error():
    content = os.urandom(2000)
    transfer = TftpTransfer(len(content), TransferParameters(),
                            lambda off, n: content[off:off + min(n, 100)],
                            policy=RetransmitPolicy(), now=0.0)
    with pytest.raises(OSError, match="changed while"):
        transfer.start(0.0)


@pytest.mark.parametrize("text", [b"", b"a\nb\r\nc\r", b"\n" * 1000, b"x" * 511 + b"\n"])
def test_netascii_view_converts_and_allows_rereading_a_window(text):
    reader = NetasciiReader(lambda off, n: text[off:off + n], len(text))
    expected = to_netascii(text)
    assert reader.size == len(expected)
    reader.keep = 0
    assert reader.read(0, 7) == expected[:7]
    assert reader.read(7, 600) == expected[7:607]
    assert reader.read(0, 10) == expected[:10]      # behind the kept data: restarts
    assert b"\r\0" not in to_netascii(b"\n") and to_netascii(b"\r") == b"\r\0"


def test_timeout_after_a_loss_returns_to_normal_on_the_next_clean_ack():
    policy = RetransmitPolicy(initial=1.0, minimum=0.02, maximum=8.0)
    transfer = _transfer(os.urandom(512 * 40), policy=policy)
    transfer.start(0.0)
    now = 0.0
    for block in range(1, 17):
        now += 0.001
        transfer.on_ack(block, now)
    assert transfer.rto == pytest.approx(0.02)
    now = transfer.deadline
    transfer.on_timeout(now)                        # block 17 or its ACK was lost
    assert transfer.rto == pytest.approx(0.04)
    transfer.on_ack(17, now + 0.001)                # Karn: no sample from a resent block
    transfer.on_ack(18, now + 0.002)                # block 18 was sent once: sampled
    assert transfer.rto == pytest.approx(0.02)


# The service's policy with the default settings (TftpService builds it from TftpConfig).
SERVICE_POLICY = RetransmitPolicy(initial=1.0, minimum=0.02, maximum=8.0, retries=5,
                                  give_up_after=30.0, silent_timeout=3.0)


def _until_given_up(transfer: TftpTransfer) -> list[tuple[float, list[bytes]]]:
    """Let every deadline pass (a silent client): when the transfer sent what, until it ends."""
    sent = []
    while transfer.active:
        now = transfer.deadline
        sent.append((now, transfer.on_timeout(now)))
    return sent


@pytest.mark.parametrize("timeout", [None, 1])
def test_a_client_silent_after_one_ack_gets_the_window_twice_then_one_block_a_timeout(timeout):
    """Issue 13: one ACK of the OACK, then silence, got the whole window resent on each of
    the 11 timeouts before the transfer gave up (30 with a client timeout of 1 s, which does
    not back off). Now the window goes out once more, then only its first and last blocks."""
    content = bytes(1024 * 100)
    options = (("blksize", "1024"), ("windowsize", "16"))
    if timeout:
        options += (("timeout", str(timeout)),)
    transfer = _transfer(content, negotiate(options, len(content)), policy=SERVICE_POLICY)
    transfer.start(0.0)
    first = transfer.on_ack(0, 0.001)
    assert [b.block for b in _blocks(first)] == list(range(1, 17)) and transfer.answered
    sent = _until_given_up(transfer)
    assert sent[0][1] == first
    assert {tuple(out) for _, out in sent[1:-1]} == {(transfer.packet(1), transfer.packet(16))}
    assert [parse(d) for d in sent[-1][1]] == [Error(0, "timeout")]
    assert transfer.failure == "client stopped answering"
    assert len(sent) <= (31 if timeout else 12)
    times = [0.001] + [at for at, _ in sent]
    # Still the long waits a real client may need (atftp re-ACKs after 5 s of silence).
    assert timeout or max(b - a for a, b in itertools.pairwise(times)) > 5.0
    assert 30.0 <= times[-1] <= 30.0 + SERVICE_POLICY.maximum


@pytest.mark.parametrize("ack, window", [(4, [5, 6, 7, 8]), (2, [3, 4, 5, 6])])
def test_the_probe_keeps_the_window_so_that_any_ack_in_it_moves_on(ack, window):
    transfer = _transfer(bytes(64 * 40), negotiate((("blksize", "64"), ("windowsize", "4")),
                                                   64 * 40), policy=SERVICE_POLICY)
    transfer.start(0.0)
    transfer.on_ack(0, 0.001)
    assert len(transfer.on_timeout(transfer.deadline)) == 4   # the window again
    assert [b.block for b in _blocks(transfer.on_timeout(transfer.deadline))] == [1, 4]
    assert [b.block for b in _blocks(transfer.on_ack(ack, transfer.deadline))] == window


@pytest.mark.parametrize("options", [(), (("blksize", "1468"),)])
def test_a_client_that_never_answers_frees_its_slot_after_silent_timeout(options):
    """Issue 13: 1000 such requests held every slot for 30 s; now silent_timeout (3 s)."""
    content = bytes(5000)
    transfer = _transfer(content, negotiate(options, len(content)), policy=SERVICE_POLICY)
    assert len(transfer.start(0.0)) == 1 and not transfer.answered
    sent = _until_given_up(transfer)
    assert [at for at, _ in sent] == [1.0, SERVICE_POLICY.silent_timeout]
    assert transfer.failure == "client never answered" and not transfer.answered
    assert isinstance(parse(sent[-1][1][0]), Error)
