"""The TFTP service in-process on loopback: requests, refusals, TIDs, limits, events."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import replace

import pytest

from configserver import eventloop
from configserver.config import ServerConfig, TftpConfig
from configserver.tftp.codec import Ack, Data, Error, ErrorCode, OptionAck, ReadRequest, parse
from configserver.tftp.errors import TftpSocketError
from configserver.tftp.service import ActiveTransfer, LockstepTransfer, start_tftp

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
    service, address, _ = await service_factory()
    client = UdpClient()
    await client.send(ReadRequest("big.bin", "octet"), address)
    await client.send(ReadRequest("big.bin", "octet"), address)
    await client.receive()
    assert len(service.transfers) == 1
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
        # for twice the smoothed round trip.
        assert 20 <= len(expected) <= 41
        assert all(0 < poll < 2 * busy_poll for poll in expected)
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
    for settings, name, mode in (({}, "text.txt", "netascii"),
                                 ({"lockstep_threads": 0}, "big.bin", "octet")):
        service, _ = await _service(root, **settings)
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
