#!/usr/bin/env python3
"""The DHCP hot path in-process: relayed DORA exchanges of a registered fleet, no sockets.

Builds the registry (--nodes machines applied as an inventory, as bench/dhcp/run does), the
lease store and the policy as ``start_dhcp`` does, and feeds DISCOVER and REQUEST datagrams
(perfdhcp's, with each node's MAC) through ``DhcpService.handle_datagram`` on a running event
loop, so the registry's writer and the lease store's group commit run as they do in the
server. Prints exchanges/s with boot events on and off (--events on,off), and with --profile
the top of a cProfile of the run.

    .venv/bin/python bench/dhcp/hotpath.py [--nodes 1000] [--exchanges 20000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

from configserver.config import DhcpConfig, DhcpMode, ServerConfig, Subnet
from configserver.dhcp import codec
from configserver.dhcp.codec import DhcpPacket, MessageType
from configserver.dhcp.leases import LeaseStore
from configserver.dhcp.policy import DHCP_PORT, DhcpPolicy
from configserver.dhcp.service import DhcpService
from configserver.model import Nic, NodeSpec
from configserver.registry.sqlite import SqliteRegistry

SERVER = "198.18.0.1"
RELAY = "198.19.0.1"
MAC_BASE = 0x525400B00000
PARAMS = bytes((1, 28, 2, 3, 15, 6, 12))  # perfdhcp's option 55


class Endpoint:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes, to: object) -> None:
        self.sent.append(data)


def mac_bytes(n: int) -> bytes:
    return (MAC_BASE + n).to_bytes(6, "big")


def fleet(count: int) -> list[NodeSpec]:
    return [NodeSpec(mac=(MAC_BASE + n).to_bytes(6, "big").hex(":"),
                     role="dom0" if n % 2 else "storage", hostname=f"node-{n:04d}",
                     ip=codec.int_to_ip(0xC6130010 + n), tags=(f"rack{n // 40:02d}",),
                     extra_nics=(Nic((MAC_BASE + 0x10000 + n).to_bytes(6, "big").hex(":")),))
            for n in range(count)]


def discover(n: int, xid: int) -> bytes:
    return codec.encode(DhcpPacket(op=1, xid=xid, chaddr=mac_bytes(n), giaddr=RELAY, options={
        53: bytes((MessageType.DISCOVER,)), 55: PARAMS}))


def request(n: int, xid: int, offer: DhcpPacket) -> bytes:
    return codec.encode(DhcpPacket(op=1, xid=xid, chaddr=mac_bytes(n), giaddr=RELAY, options={
        53: bytes((MessageType.REQUEST,)), 55: PARAMS, 50: codec._aton(offer.yiaddr),
        54: offer.options[codec.OPT_SERVER_ID]}))


async def run(state: Path, nodes: int, exchanges: int, events: bool,
              profiler: cProfile.Profile | None) -> tuple[float, str]:
    registry = SqliteRegistry(state / "registry.sqlite")
    registry.apply(fleet(nodes))
    relayed = Subnet("198.19.0.0/16", pool=("198.19.16.0", "198.19.255.250"), router=RELAY)
    config = ServerConfig(state_dir=state, interface="eth0", dhcp=DhcpConfig(
        mode=DhcpMode.FULL, subnet=Subnet("198.18.0.0/24"), relayed=(relayed,),
        relays=(RELAY,)))
    leases = LeaseStore(state / "leases.sqlite")
    policy = DhcpPolicy(config.dhcp, registry, leases, server_address=SERVER,
                        http_base=f"http://{SERVER}:8080", tftp_enabled=True)
    if not events:
        policy._record = lambda *args, **kwargs: None  # type: ignore[method-assign]
    service = DhcpService(config, registry, leases, policy)
    endpoint = Endpoint()
    source = (RELAY, 67)
    if profiler:
        profiler.enable()
    start = time.perf_counter()
    for i in range(exchanges):
        n = i % nodes if nodes else i
        wire = service.handle_datagram(discover(n, 2 * i), source, DHCP_PORT, endpoint)
        assert wire is not None
        service.handle_datagram(request(n, 2 * i + 1, codec.decode(wire)), source, DHCP_PORT,
                                endpoint)
        if i % 64 == 63:
            await asyncio.sleep(0)  # the datagrams of one loop iteration, then other tasks
    await leases.drain()
    elapsed = time.perf_counter() - start
    if profiler:
        profiler.disable()
    await service.close()
    cache, writer = getattr(registry, "_cache", None), getattr(registry, "writer", None)
    stats = "; ".join(
        ([f"registry cache {cache.hits} hits, {cache.misses} misses"] if cache else [])
        + ([f"writer {writer.commits} commits, {writer.dropped} events dropped"]
           if writer else []))
    registry.close()
    acks = sum(codec.decode(d).message_type == MessageType.ACK for d in endpoint.sent)
    assert acks == exchanges, (acks, exchanges)
    return exchanges / elapsed, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--exchanges", type=int, default=20000)
    parser.add_argument("--events", default="on,off")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    for mode in args.events.split(","):
        profiler = cProfile.Profile() if args.profile else None
        with tempfile.TemporaryDirectory(prefix="dhcp-profile-") as state:
            rate, stats = asyncio.run(run(Path(state), args.nodes, args.exchanges,
                                          mode == "on", profiler))
        print(f"boot events {mode:3}: {rate:7.0f} exchanges/s ({args.exchanges} exchanges, "
              f"{args.nodes} nodes; {stats})", flush=True)
        if profiler:
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
