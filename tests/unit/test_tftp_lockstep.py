"""The lock-step sender alone, in a thread, against a client socket on loopback.

Its place in the service (the thread cap, events, polling held) is in test_tftp_service.py.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import replace

import pytest

from configserver.tftp.codec import Ack, Data, Error, ErrorCode, OptionAck, parse
from configserver.tftp.lockstep import LockstepSender
from configserver.tftp.options import TransferParameters
from configserver.tftp.server import open_connected_pair
from configserver.tftp.transfer import RetransmitPolicy, TftpTransfer

QUICK = RetransmitPolicy(initial=0.2, minimum=0.05, maximum=0.4, retries=2,
                         give_up_after=0.5)


class Exchange:
    """A LockstepSender running in a thread, and a blocking client socket to talk to it."""

    def __init__(self, path, params: TransferParameters, policy: RetransmitPolicy = QUICK):
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.bind(("127.0.0.1", 0))
        self.client.settimeout(3)
        sock, self.others = open_connected_pair("127.0.0.1", None, self.client.getsockname())
        self.fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        self.transfer = TftpTransfer(size, params, lambda o, n: os.pread(self.fd, n, o),
                                     policy=policy, now=time.monotonic())
        self.strays: list[tuple] = []
        self.sender = LockstepSender(sock, self.client.getsockname(), self.transfer,
                                     fd=self.fd, stray=lambda *a: self.strays.append(a))
        self.thread = threading.Thread(target=self.sender.run)
        self.thread.start()

    def receive(self):
        data, sender = self.client.recvfrom(70000)
        return parse(data), sender

    def send(self, packet, tid) -> None:
        self.client.sendto(packet.encode(), tid)

    def fetch(self, blksize: int) -> bytes:
        received, expected = bytearray(), 1
        while True:
            packet, tid = self.receive()
            if isinstance(packet, OptionAck):
                self.send(Ack(0), tid)
                continue
            assert isinstance(packet, Data), packet
            self.send(Ack(packet.block), tid)
            if packet.block != expected & 0xFFFF:
                continue
            expected += 1
            received += packet.payload
            if len(packet.payload) < blksize:
                return bytes(received)

    def close(self) -> None:
        self.sender.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.sender.close()
        self.others.close()
        self.client.close()
        os.close(self.fd)


@pytest.fixture
def exchanges():
    made: list[Exchange] = []

    def make(*args, **kwargs) -> Exchange:
        made.append(Exchange(*args, **kwargs))
        return made[-1]

    yield make
    for exchange in made:
        exchange.close()


# Sizes around a block and around the read-ahead buffer (256 slots of 512 bytes).
@pytest.mark.parametrize("size", [0, 511, 512, 513, 256 * 512, 256 * 512 + 1, 600 * 512 + 7])
def test_whole_file_in_lockstep(tmp_path, exchanges, size):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(size))
    exchange = exchanges(path, TransferParameters())
    assert exchange.fetch(512) == path.read_bytes()
    exchange.thread.join(2)
    assert exchange.transfer.finished_ok and exchange.sender.read_error is None


def test_oack_first_then_blocks_of_the_negotiated_size(tmp_path, exchanges):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(5000))
    params = TransferParameters(blksize=1468, oack=(("blksize", "1468"), ("tsize", "5000")))
    exchange = exchanges(path, params)
    assert exchange.fetch(1468) == path.read_bytes()
    exchange.thread.join(2)
    assert exchange.transfer.finished_ok


def test_unanswered_block_is_resent_at_the_deadline_then_the_transfer_gives_up(tmp_path,
                                                                             exchanges):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(2000))
    exchange = exchanges(path, TransferParameters())
    first, _ = exchange.receive()
    sent = time.monotonic()
    again, _ = exchange.receive()
    waited = time.monotonic() - sent
    assert again == first
    # The state machine's first timeout is QUICK.initial; the receive timeout keeps to it.
    assert QUICK.initial - 0.01 <= waited <= QUICK.initial + 0.15
    packets = []
    while True:
        packet, _ = exchange.receive()
        packets.append(packet)
        if isinstance(packet, Error):
            break
    assert all(p == first for p in packets[:-1])
    assert packets[-1] == Error(ErrorCode.NOT_DEFINED, "timeout")
    exchange.thread.join(2)
    assert exchange.transfer.failure == "client stopped answering"


def test_a_duplicate_ack_sends_nothing_and_keeps_the_deadline(tmp_path, exchanges):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(2000))
    exchange = exchanges(path, TransferParameters())
    first, tid = exchange.receive()
    exchange.send(Ack(1), tid)
    second, _ = exchange.receive()
    sent = time.monotonic()
    exchange.send(Ack(1), tid)  # stale: block 2 stands; only the timer resends it
    again, _ = exchange.receive()
    assert again == second and isinstance(first, Data)
    assert time.monotonic() - sent >= QUICK.initial - 0.01


def test_client_error_ends_the_transfer(tmp_path, exchanges):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(2000))
    exchange = exchanges(path, TransferParameters())
    _, tid = exchange.receive()
    exchange.send(Error(ErrorCode.NOT_DEFINED, "enough"), tid)
    exchange.thread.join(2)
    assert not exchange.thread.is_alive()
    assert exchange.transfer.failure == "client error 0: enough"


def test_stop_wakes_the_thread_and_aborts(tmp_path, exchanges):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(2000))
    exchange = exchanges(path, TransferParameters(), replace(QUICK, initial=5, maximum=5))
    exchange.receive()
    started = time.monotonic()
    exchange.sender.stop()
    exchange.thread.join(2)
    assert time.monotonic() - started < 1
    assert exchange.transfer.failure == "server stopping"


def test_a_file_shrinking_under_the_transfer_is_a_read_error(tmp_path, exchanges):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(600 * 512))
    exchange = exchanges(path, TransferParameters())
    last = 0
    packet, tid = exchange.receive()
    while isinstance(packet, Data):
        last = packet.block
        if last == 250:
            os.truncate(path, 1000)  # blocks 2 to 257 are read already (1 by start)
        exchange.send(Ack(last), tid)
        packet, tid = exchange.receive()
    assert last == 257
    assert packet == Error(ErrorCode.NOT_DEFINED, "server read error")
    exchange.thread.join(2)
    assert isinstance(exchange.sender.read_error, OSError)
    assert exchange.transfer.failure.startswith("read error: ")


def test_only_windowsize_1():
    params = TransferParameters(windowsize=2)
    transfer = TftpTransfer(10, params, lambda o, n: b"", now=0.0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, \
            pytest.raises(ValueError, match="windowsize 1"):
        LockstepSender(sock, ("127.0.0.1", 9), transfer, fd=-1, stray=print)
