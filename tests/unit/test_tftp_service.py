"""The TFTP service in-process on loopback: requests, refusals, TIDs, limits, events."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import statistics
from dataclasses import replace

import pytest
from fuzzing import mutated, scaled
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from configserver import eventloop
from configserver.config import ServerConfig, TftpConfig
from configserver.tftp.codec import (
    Ack,
    Data,
    Error,
    ErrorCode,
    OptionAck,
    ReadRequest,
    TransferMode,
    WriteRequest,
    parse,
)
from configserver.tftp.errors import TftpSocketError
from configserver.tftp.limits import ClientShare
from configserver.tftp.service import (
    ActiveTransfer,
    LockstepTransfer,
    TftpService,
    start_tftp,
)

MAC = "52:54:00:12:34:56"


class UdpClient:
    """A bare TFTP client socket: send packets, receive parsed ones with a timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)

    async def send(self, packet, address) -> None:
        await asyncio.get_running_loop().sock_sendto(self.sock, packet.encode(), address)

    async def send_raw(self, datagram: bytes, address) -> None:
        await asyncio.get_running_loop().sock_sendto(self.sock, datagram, address)

    async def receive(self, timeout: float = 2.0):
        data, sender = await asyncio.wait_for(
            asyncio.get_running_loop().sock_recvfrom(self.sock, 70000), timeout)
        return parse(data), sender

    async def fetch(self, name: str, server, options=()) -> bytes:
        await self.send(ReadRequest(name, "octet", options), server)
        received, expected = bytearray(), 1
        while True:
            packet, tid = await self.receive()
            if isinstance(packet, OptionAck):
                await self.send(Ack(0), tid)
                continue
            assert isinstance(packet, Data), packet
            await self.send(Ack(packet.block), tid)
            if packet.block != (expected & 0xFFFF):
                continue  # a retransmission of a block we already have
            expected += 1
            received += packet.payload
            if len(packet.payload) < int(dict(options).get("blksize", 512)):
                return bytes(received)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def root(tmp_path):
    (tmp_path / "small.bin").write_bytes(os.urandom(1300))
    (tmp_path / "big.bin").write_bytes(os.urandom(512 * 40))
    return tmp_path


@pytest.fixture
async def service_factory(root):
    started, events = [], []

    async def start(**tftp_settings):
        settings = {"port": 0, "bind_address": "127.0.0.1", "timeout": 0.3,
                    "min_timeout": 0.05, **tftp_settings}
        config = replace(ServerConfig(), tftp=TftpConfig(**settings))
        service = await start_tftp(config, {"": root},
                                   resolve_mac=lambda ip: MAC if ip == "127.0.0.1" else None,
                                   record_event=lambda *e: events.append(e))
        started.append(service)
        return service, service.listener.address, events

    yield start
    for service in started:
        await service.close()


async def test_read_request_is_served_and_recorded_as_boot_events(service_factory, root):
    service, address, events = await service_factory()
    client = UdpClient()
    data = await client.fetch("small.bin", address, (("blksize", "1000"),))
    assert data == (root / "small.bin").read_bytes()
    await asyncio.sleep(0.05)
    assert [e[1] for e in events] == ["tftp.start", "tftp.done"]
    assert events[1][0] == MAC
    assert events[1][2]["bytes"] == 1300 and events[1][2]["file"] == "small.bin"
    assert events[1][2]["client"] == "127.0.0.1"
    assert service.completed == 1 and not service.transfers and len(service.files) == 0
    client.close()


@pytest.mark.parametrize("datagram, code", [
    (b"\x00\x02small.bin\x00octet\x00", ErrorCode.ACCESS_VIOLATION),
    (b"\x00\x01../etc/passwd\x00octet\x00", ErrorCode.ACCESS_VIOLATION),
    (b"\x00\x01/etc/passwd\x00octet\x00", ErrorCode.ACCESS_VIOLATION),
    (b"\x00\x01missing.bin\x00octet\x00", ErrorCode.FILE_NOT_FOUND),
    (b"\x00\x01small.bin\x00mail\x00", ErrorCode.ILLEGAL_OPERATION),
])
async def test_refusals_carry_the_right_error(service_factory, datagram, code):
    _, address, _ = await service_factory()
    client = UdpClient()
    await client.send_raw(datagram, address)
    packet, _ = await client.receive()
    assert isinstance(packet, Error) and packet.code == code
    client.close()


async def test_unknown_tid_gets_error_5_and_the_transfer_continues(service_factory, root):
    _, address, _ = await service_factory()
    client, intruder = UdpClient(), UdpClient()
    await client.send(ReadRequest("big.bin", "octet"), address)
    first, tid = await client.receive()
    assert isinstance(first, Data) and first.block == 1
    await intruder.send(Ack(1), tid)
    packet, sender = await intruder.receive()
    assert isinstance(packet, Error) and packet.code == ErrorCode.UNKNOWN_TID and sender == tid
    received, expected = bytearray(first.payload), 2
    await client.send(Ack(1), tid)
    while True:
        packet, _ = await client.receive()
        await client.send(Ack(packet.block), tid)
        if packet.block != expected:
            continue  # a retransmission (the test machine may be slow)
        expected += 1
        received += packet.payload
        if len(packet.payload) < 512:
            break
    assert bytes(received) == (root / "big.bin").read_bytes()
    client.close()
    intruder.close()


async def test_unanswered_block_is_retransmitted(service_factory):
    _, address, _ = await service_factory()
    client = UdpClient()
    await client.send(ReadRequest("big.bin", "octet"), address)
    first, _ = await client.receive()
    again, _ = await client.receive(timeout=1.0)
    assert again == first
    client.close()


async def test_duplicate_request_does_not_start_a_second_transfer(service_factory):
    """A retransmitted RRQ from the same TID is answered by the running transfer alone.

    A second transfer would answer from a second port (and replace the first in the table,
    so counting the table alone does not show it): the test listens for every DATA that
    comes and checks that one transfer sent them all.
    """
    service, address, events = await service_factory()
    client = UdpClient()
    await client.send(ReadRequest("big.bin", "octet"), address)
    await client.send(ReadRequest("big.bin", "octet"), address)
    senders = set()
    with pytest.raises(TimeoutError):
        while True:
            packet, tid = await client.receive(timeout=0.2)
            assert isinstance(packet, Data) and packet.block == 1, packet
            senders.add(tid)
    assert len(senders) == 1
    assert len(service.transfers) == 1
    assert service.per_client.shares == {"127.0.0.1": ClientShare(transfers=1, window_bytes=512)}
    assert [e[1] for e in events] == ["tftp.start"]
    client.close()


async def test_per_client_limit_refuses_the_extra_transfer(service_factory):
    service, address, _ = await service_factory(max_transfers_per_client=2)
    clients = [UdpClient() for _ in range(3)]
    for client in clients[:2]:
        await client.send(ReadRequest("big.bin", "octet"), address)
        assert isinstance((await client.receive())[0], Data)
    await clients[2].send(ReadRequest("big.bin", "octet"), address)
    packet, _ = await clients[2].receive()
    assert isinstance(packet, Error) and "too many" in packet.message
    assert len(service.transfers) == 2
    for client in clients:
        client.close()


async def test_a_full_server_ends_the_oldest_silent_transfer_for_a_new_client(
        service_factory, root):
    """Issue 13: requests nobody answers filled every slot and kept real clients out for
    30 s. Now the oldest transfer that was never answered makes room (ERROR 0 to it)."""
    service, address, events = await service_factory(max_transfers=4, lockstep_threads=0)
    silent = [UdpClient() for _ in range(4)]
    fresh = UdpClient()
    try:
        for client in silent:
            await client.send(ReadRequest("big.bin", "octet", (("blksize", "1024"),)),
                              address)
            assert isinstance((await client.receive())[0], OptionAck)
        assert await fresh.fetch("small.bin", address) == (root / "small.bin").read_bytes()
        packet, _ = await silent[0].receive()
        assert isinstance(packet, Error) and packet.message == "server busy"
        errors = [e[2]["error"] for e in events if e[1] == "tftp.error"]
        assert errors == ["evicted: server full and the client never answered"]
        assert service.completed == 1 and len(service.transfers) == 3
    finally:
        for client in (*silent, fresh):
            client.close()


async def test_a_client_that_never_answers_frees_its_slot_after_silent_timeout(
        service_factory):
    service, address, events = await service_factory(silent_timeout=0.2, timeout=0.3)
    client = UdpClient()
    try:
        await client.send(ReadRequest("big.bin", "octet"), address)
        assert isinstance((await client.receive())[0], Data)
        packet, _ = await client.receive(timeout=1.0)
        assert isinstance(packet, Error)
        # A lockstep transfer's thread sends the ERROR, then the loop frees its slot: the
        # client may hear it first (seen under load in CI).
        for _ in range(200):
            if not service.transfers and not service.per_client and not service.unanswered:
                break
            await asyncio.sleep(0.01)
        assert not service.transfers and not service.per_client and not service.unanswered
        assert events[-1][2]["error"] == "client never answered"
    finally:
        client.close()


async def test_the_bytes_in_flight_to_one_address_are_capped(service_factory, root):
    """Issue 13: one client could have 256 blocks of 65464 bytes resent to it; now the
    windows of all its transfers together fit max_inflight_per_client."""
    service, address, _ = await service_factory(max_inflight_per_client=4096)
    wide = (("blksize", "1024"), ("windowsize", "8"))
    first, second = UdpClient(), UdpClient()
    try:
        await first.send(ReadRequest("big.bin", "octet", wide), address)
        oack, tid = await first.receive()
        assert oack == OptionAck((("blksize", "1024"), ("windowsize", "4")))
        await second.send(ReadRequest("big.bin", "octet", wide), address)
        refused, _ = await second.receive()
        assert isinstance(refused, Error) and "in flight" in refused.message
        await first.send(Ack(0), tid)
        received = bytearray()
        while len(received) < 512 * 40:
            packet, _ = await first.receive()
            if packet.block == (len(received) // 1024 + 1) & 0xFFFF:
                received += packet.payload
                if packet.block % 4 == 0 or len(received) == 512 * 40:
                    await first.send(Ack(packet.block), tid)
        await first.send(Ack(21), tid)
        assert bytes(received) == (root / "big.bin").read_bytes()
        for _ in range(100):
            if not service.per_client:
                break
            await asyncio.sleep(0.01)
        assert await second.fetch("small.bin", address, wide) == (
            root / "small.bin").read_bytes()
    finally:
        first.close()
        second.close()


async def test_malformed_requests_are_dropped_and_logged_rate_limited(service_factory, caplog,
                                                                    root):
    service, address, _ = await service_factory()
    client = UdpClient()
    with caplog.at_level(logging.WARNING, logger="configserver.tftp.service"):
        for _ in range(50):
            await client.send_raw(b"\x00\x01no-terminator", address)
        await asyncio.sleep(0.1)
        with pytest.raises(TimeoutError):
            await client.receive(timeout=0.2)
    assert 1 <= len([r for r in caplog.records if "malformed" in r.getMessage()]) <= 10
    assert service.bad_packets.suppressed >= 40
    assert await client.fetch("small.bin", address) == (root / "small.bin").read_bytes()
    client.close()


async def test_close_aborts_running_transfers(service_factory):
    service, address, events = await service_factory()
    client = UdpClient()
    await client.send(ReadRequest("big.bin", "octet"), address)
    await client.receive()
    await service.close()
    assert not service.transfers and len(service.files) == 0
    assert events[-1][1] == "tftp.error" and events[-1][2]["error"] == "server stopping"
    client.close()


async def test_every_transfer_gets_its_own_port(service_factory):
    """Binding port 0 with SO_REUSEADDR could hand out one port twice and cross the ACKs."""
    _, address, _ = await service_factory(max_transfers_per_client=200)
    clients = [UdpClient() for _ in range(200)]
    for client in clients:
        await client.send(ReadRequest("big.bin", "octet"), address)
    tids = {(await client.receive())[1] for client in clients}
    assert len(tids) == len(clients)
    for client in clients:
        client.close()


# 50 ms is above what the configuration accepts, so that a slow test machine stays "quick".
@pytest.mark.parametrize("busy_poll", [0.05, 1e-7, 0.0])
async def test_quick_lockstep_client_is_waited_for_by_polling(root, busy_poll):
    loop = asyncio.get_running_loop()
    expected: list[float] = []
    # On the event loop: lock-step threads do not poll (lockstep_threads=0 keeps them off).
    config = replace(ServerConfig(), tftp=TftpConfig(port=0, bind_address="127.0.0.1",
                                                     busy_poll=busy_poll, lockstep_threads=0))
    service = await start_tftp(config, {"": root}, resolve_mac=lambda ip: None,
                               record_event=lambda *e: None,
                               expect_event=lambda until: expected.append(until - loop.time()))
    client = UdpClient()
    try:
        data = await client.fetch("big.bin", service.listener.address)
    finally:
        client.close()
        await service.close()
    assert data == (root / "big.bin").read_bytes()
    if busy_poll == 0.05:
        # From the first RTT sample (block 8 of 41) on, each block sent asks for polling,
        # for twice the smoothed round trip. (Each window is read off the clock a moment
        # after the service set it: a test thread preempted in between sees one end in the
        # past, so only the median must lie ahead.)
        assert 20 <= len(expected) <= 41
        assert all(poll < 2 * busy_poll for poll in expected)
        assert statistics.median(expected) > 0
    else:
        # Polling off, or no client that quick (a loopback round trip is well above 0.1 us).
        assert expected == []


async def test_port_in_use_is_a_clear_error(root):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        config = replace(ServerConfig(), tftp=TftpConfig(port=port, bind_address="127.0.0.1"))
        with pytest.raises(TftpSocketError, match=f"cannot open TFTP port 127.0.0.1:{port}"):
            await start_tftp(config, {"": root}, resolve_mac=lambda ip: None,
                             record_event=lambda *e: None)


# -- property test --------------------------------------------------------------------------

_NUMBERS = st.integers(-1, 70000).map(str) | st.sampled_from(["", "1e3", " 8", "abc"])
_OPTIONS = st.lists(st.tuples(st.sampled_from(("blksize", "tsize", "windowsize", "timeout",
                                               "x")), _NUMBERS), max_size=5).map(tuple)
# Requests the service serves, and requests it refuses.
_GOOD_REQUESTS = st.builds(
    lambda name, mode, options: ReadRequest(name, mode, options).encode(),
    st.sampled_from(("small.bin", "text.txt")),
    st.sampled_from((TransferMode.OCTET, TransferMode.NETASCII)), _OPTIONS)
_BAD_REQUESTS = st.builds(
    lambda cls, name, mode, options: cls(name, mode, options).encode(),
    st.sampled_from((ReadRequest, WriteRequest)),
    st.sampled_from(("small.bin", "missing.bin", "../small.bin", "/etc/passwd",
                     "sub/../small.bin", "SMALL.BIN")),
    st.sampled_from(TransferMode), _OPTIONS)
_DATAGRAMS = st.one_of(
    st.binary(max_size=60), _GOOD_REQUESTS, _BAD_REQUESTS,
    st.builds(lambda opcode, body: bytes((0, opcode)) + body, st.integers(0, 7),
              st.binary(max_size=20)),
    mutated(_GOOD_REQUESTS | _BAD_REQUESTS,
            st.binary(min_size=1, max_size=8) | st.sampled_from([b"\0", b"octet\0"]),
            max_edits=3))
# What a client (or anyone else) may send to a transfer's port: mostly ACK and ERROR, the
# two packets a transfer reads, whole or cut short anywhere.
_CLIENT_PACKETS = st.one_of(
    st.builds(lambda block: Ack(block).encode(), st.integers(0, 3)),
    st.builds(lambda code, text: Error(code, text).encode(), st.integers(0, 9),
              st.sampled_from(("", "stop"))),
    st.builds(lambda block: Data(block, b"up").encode(), st.integers(0, 3)))
_TO_TRANSFER = st.lists(
    st.tuples(st.booleans(), st.one_of(
        st.builds(lambda packet, cut: packet[:cut], _CLIENT_PACKETS, st.integers(0, 9)),
        _CLIENT_PACKETS,
        st.binary(max_size=12))),
    max_size=6)


@pytest.fixture(scope="module")
def quiet_service(tmp_path_factory):
    """A service on a loop that never runs: on_request and on_datagram are called directly,
    so that what they raise reaches the test (the listener would log it and go on). Every
    transfer stays on the loop (``lockstep_threads = 0``): the worker-thread path has tests of
    its own below."""
    root = tmp_path_factory.mktemp("tftp-root")
    (root / "small.bin").write_bytes(bytes(range(256)) * 5)
    (root / "text.txt").write_bytes(b"one\ntwo\r\n" * 30)
    loop = asyncio.new_event_loop()
    config = TftpConfig(port=0, bind_address="127.0.0.1", timeout=0.3, min_timeout=0.05,
                        lockstep_threads=0)
    service = TftpService(config, None, {"": root}, resolve_mac=lambda ip: MAC,
                          record_event=lambda *e: None, loop=loop)
    service.listen()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.setblocking(False)
    yield service, client, loop
    loop.run_until_complete(service.close())
    loop.close()
    client.close()


def _drain(sock) -> list[tuple[bytes, tuple]]:
    received = []
    while True:
        try:
            received.append(sock.recvfrom(70000))
        except BlockingIOError:
            return received


@given(request=_DATAGRAMS, followups=_TO_TRANSFER)
@example(request=ReadRequest("small.bin", TransferMode.OCTET).encode(),
         followups=[(True, b"\0\x04\0"), (False, b"\0\x05"), (True, b"\0\x05\0")])
@settings(max_examples=scaled(1.0))
def test_service_answers_or_drops_any_datagram(quiet_service, request, followups):
    service, client, loop = quiet_service
    address = client.getsockname()
    try:
        service.on_request(request, address, "127.0.0.1")
        answers = _drain(client)  # loopback delivers within sendto
        assert len(answers) <= 1, answers
        active = service.transfers.get(address)
        if active is None:
            event("refused" if answers else "dropped")
            for data, sender in answers:
                assert sender == service.listener.address
                assert isinstance(parse(data), Error)
            return
        event("transfer")
        [(data, tid)] = answers
        assert tid != service.listener.address
        assert isinstance(parse(data), Data | OptionAck)
        for from_client, datagram in followups:
            if service.transfers.get(address) is not active:
                break  # the transfer ended (and closed its port)
            active.on_datagram(datagram, address if from_client else ("127.0.0.1", 9))
        _drain(client)
    finally:
        for active in list(service.transfers.values()):
            active.transfer.abort("example over", loop.time())
            service.finish(active)
        _drain(client)
    assert not service.per_client and len(service.files) == 0


# -- windowsize-1 transfers in threads of their own (lockstep.py) ----------------------------

async def _service(root, **settings):
    config = replace(ServerConfig(), tftp=TftpConfig(port=0, bind_address="127.0.0.1",
                                                     **settings))
    events: list[tuple] = []
    service = await start_tftp(config, {"": root}, resolve_mac=lambda ip: "52:54:00:00:00:01",
                               record_event=lambda *e: events.append(e))
    return service, events


async def test_lockstep_transfers_take_threads_up_to_the_cap_then_the_loop(root):
    service, events = await _service(root, lockstep_threads=2, max_transfers_per_client=8)
    clients = [UdpClient() for _ in range(3)]
    windowed = UdpClient()
    try:
        for client in clients:
            await client.send(ReadRequest("big.bin", "octet"), service.listener.address)
            assert isinstance((await client.receive())[0], Data)
        await windowed.send(ReadRequest("big.bin", "octet", (("windowsize", "2"),)),
                            service.listener.address)
        assert isinstance((await windowed.receive())[0], OptionAck)
        kinds = [type(t) for t in service.transfers.values()]
        assert kinds == [LockstepTransfer, LockstepTransfer, ActiveTransfer, ActiveTransfer]
        assert service.lockstep_running == 2
    finally:
        for client in (*clients, windowed):
            client.close()
        await service.close()
    assert service.lockstep_running == 0 and not service.transfers
    assert [e[2]["error"] for e in events if e[1] == "tftp.error"] == ["server stopping"] * 4


async def test_lockstep_transfer_is_recorded_like_any_other(root):
    service, events = await _service(root)
    client = UdpClient()
    try:
        data = await client.fetch("big.bin", service.listener.address)
        for _ in range(100):
            if not service.transfers:
                break
            await asyncio.sleep(0.01)
    finally:
        client.close()
        await service.close()
    assert data == (root / "big.bin").read_bytes()
    assert [e[1] for e in events] == ["tftp.start", "tftp.done"]
    assert events[1][2]["bytes"] == 512 * 40
    assert service.completed == 1 and service.lockstep_running == 0 and len(service.files) == 0


async def test_netascii_and_lockstep_threads_0_stay_on_the_loop(root):
    (root / "text.txt").write_bytes(b"line\n" * 100)
    for overrides, name, mode in (({}, "text.txt", "netascii"),
                                  ({"lockstep_threads": 0}, "big.bin", "octet")):
        service, _ = await _service(root, **overrides)
        client = UdpClient()
        try:
            await client.send(ReadRequest(name, mode), service.listener.address)
            await client.receive()
            assert [type(t) for t in service.transfers.values()] == [ActiveTransfer]
        finally:
            client.close()
            await service.close()


def test_the_polling_loop_does_not_poll_while_a_lockstep_thread_runs(root):
    """A polling event loop would keep the thread waiting for the GIL (eventloop.py)."""
    held: list[bool] = []

    async def main(selector):
        service, _ = await _service(root, busy_poll=0.001)
        client = UdpClient()
        try:
            await client.send(ReadRequest("big.bin", "octet"), service.listener.address)
            packet, tid = await client.receive()
            held.append(selector.held)
            while len(packet.payload) == 512:
                await client.send(Ack(packet.block), tid)
                packet, tid = await client.receive()
            await client.send(Ack(packet.block), tid)
            for _ in range(100):
                if not service.transfers:
                    break
                await asyncio.sleep(0.01)
            held.append(selector.held)
        finally:
            client.close()
            await service.close()

    eventloop.run(main)
    assert held == [True, False]
