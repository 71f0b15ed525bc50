"""Issue 13 with real clients: a flood of random MACs (perfdhcp) and clients posing as relays.

perfdhcp sets giaddr to its own address even when it broadcasts, so it acts as a relay: the
flood comes "through" 198.18.0.2 (listed in dhcp.relays where a test says so) into the local
pool, while dhclient asks as an ordinary client on the same link.
"""

from __future__ import annotations

import random
import re
import shutil
import sqlite3
import sys
import time

import pytest
from netlab import namespaces, veth_pair
from test_dhcp_clients import NODE_MAC, SERVER_IP, STRANGER_MAC, DhcpServer, dhclient
from test_dhcp_perfdhcp import stats

from configserver.registry.sqlite import MAX_PENDING

pytestmark = pytest.mark.netns
needs_perfdhcp = pytest.mark.skipif(shutil.which("perfdhcp") is None, reason="perfdhcp missing")

FLOODER = "198.18.0.2"
RELAY_IP = "198.19.0.1"
POSER_IP = "198.19.0.66"  # inside the relayed subnet, but not a listed relay
POOL = ("198.18.0.100", "198.18.0.199")  # 100 addresses
FLOOD = 1000


def perfdhcp(ns, local: str, count: int, rate: int, server: str = SERVER_IP):
    # -R: that many distinct random MACs; -d 2: a lost answer counts after 2 s.
    return ns.run("perfdhcp", "-4", "-l", local, "-r", str(rate), "-R", str(count),
                  "-n", str(count), "-d", "2", "-u", server, check=False, timeout=60)


def lease_time(lease_file: str) -> int:
    found = re.findall(r"option dhcp-lease-time (\d+);", lease_file)
    assert found, lease_file
    return int(found[-1])


@needs_perfdhcp
def test_random_mac_flood_leaves_addresses_for_a_node_and_a_new_client(tmp_path):
    with namespaces(2, "nbflood") as (server_ns, client_ns):
        veth_pair(server_ns, client_ns, f"{SERVER_IP}/24", f"{FLOODER}/24")
        server = DhcpServer(server_ns, tmp_path, "--log-level", "WARNING",
                            "--subnet", f"198.18.0.0/24,pool={POOL[0]}-{POOL[1]},lease=3600,"
                                        f"router={SERVER_IP}",
                            "--relay", FLOODER,
                            "--node", f"{NODE_MAC},,flood-node")  # registered, no reservation
        try:
            began = time.monotonic()
            flood = perfdhcp(client_ns, FLOODER, FLOOD, 1000)
            flood_seconds = time.monotonic() - began
            offers = stats(flood.stdout, "DISCOVER-OFFER")
            assert offers["sent packets"] >= FLOOD, (flood.stdout, flood.stderr)
            # The registered node, then a client nobody registered, right after the flood.
            client_ns.ip("link", "set", "eth0", "address", NODE_MAC)
            node_lease = dhclient(client_ns, tmp_path)
            client_ns.ip("link", "set", "eth0", "address", STRANGER_MAC)
            stranger_lease = dhclient(client_ns, tmp_path)
        finally:
            server.stop()
        log = server.log_text()
        assert "fixed-address 198.18.0.1" in node_lease, (node_lease, log[-3000:])
        assert lease_time(node_lease) == 3600
        assert "fixed-address 198.18.0.1" in stranger_lease, (stranger_lease, log[-3000:])
        assert lease_time(stranger_lease) == 300
        db = sqlite3.connect(tmp_path / "leases.sqlite")
        rows = db.execute("SELECT mac, expires - updated FROM leases WHERE state='bound'"
                          ).fetchall()
        db.close()
        flooded = [seconds for mac, seconds in rows if mac not in (NODE_MAC, STRANGER_MAC)]
        print(f"\nflood: {offers['sent packets']:.0f} DISCOVERs in {flood_seconds:.1f} s, "
              f"{offers['received packets']:.0f} offers, {len(flooded)} leases bound")
        # The flood got the burst plus the rate for its duration, never the pool, and only
        # short leases (the defaults: burst 20, 5/s, 300 s; half the pool at most).
        assert flooded and len(flooded) <= min(50, 20 + 5 * flood_seconds + 5), len(flooded)
        assert max(flooded) <= 301
        assert offers["received packets"] < FLOOD / 2


@needs_perfdhcp
def test_relayed_packets_are_answered_only_from_listed_relays(tmp_path):
    with namespaces(2, "nbrelay") as (server_ns, client_ns):
        veth_pair(server_ns, client_ns, f"{SERVER_IP}/24", f"{FLOODER}/24")
        client_ns.ip("addr", "add", f"{RELAY_IP}/16", "dev", "eth0")
        client_ns.ip("addr", "add", f"{POSER_IP}/16", "dev", "eth0")
        server_ns.ip("route", "add", "198.19.0.0/16", "via", FLOODER)
        server = DhcpServer(server_ns, tmp_path, "--log-level", "WARNING",
                            "--subnet", "198.18.0.0/24",
                            "--relayed", f"198.19.0.0/16,pool=198.19.1.0-198.19.1.200,"
                                         f"router={RELAY_IP}", "--relay", RELAY_IP,
                            "--dhcp-setting", "unknown_rate=1000",
                            "--dhcp-setting", "unknown_burst=1000")
        try:
            # A client on the link that claims to relay for 198.19.0.0/16 from another source.
            spoofed = perfdhcp(client_ns, POSER_IP, 20, 100)
            listed = perfdhcp(client_ns, RELAY_IP, 20, 100)
        finally:
            server.stop()
        log = server.log_text()
        assert stats(spoofed.stdout, "DISCOVER-OFFER")["received packets"] == 0, log[-2000:]
        assert "not in dhcp.relays" in log
        offers = stats(listed.stdout, "DISCOVER-OFFER")
        # (perfdhcp's first exchange may race the neighbour resolution of the relay route.)
        assert offers["sent packets"] >= 20, listed.stdout
        assert offers["received packets"] >= offers["sent packets"] - 2, listed.stdout


SPOOF_SENDER = r"""
import socket, sys
packets = [bytes.fromhex(line) for line in open(sys.argv[1])]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
s.bind((sys.argv[2], 0))
for i, packet in enumerate(packets):
    s.sendto(packet, (sys.argv[3], 67))
print(len(packets))
"""
PXE_MAC = "52:54:00:0d:00:01"
PXE_VENDOR = "PXEClient:Arch:00000:UNDI:002001"


def spoofed_pxe_discovers(count: int) -> str:
    """Firmware-PXE DISCOVERs from ``count`` random MACs, one hex datagram per line."""
    from configserver.dhcp import codec
    from configserver.dhcp.codec import DhcpPacket

    rng = random.Random(6)
    return "".join(codec.encode(DhcpPacket(
        op=1, xid=i, chaddr=bytes([2, *rng.randbytes(5)]),
        options={53: b"\x01", 60: PXE_VENDOR.encode(), 93: b"\0\0"})).hex() + "\n"
        for i in range(count))


def test_spoofed_pxe_flood_then_a_real_pxe_client_is_recorded_and_booted(tmp_path):
    """4096 spoofed PXE MACs used to fill the pending list: then nobody got an answer."""
    flood = tmp_path / "flood.hex"
    flood.write_text(spoofed_pxe_discovers(MAX_PENDING))
    with namespaces(2, "nbpxe") as (server_ns, client_ns):
        veth_pair(server_ns, client_ns, f"{SERVER_IP}/24", f"{FLOODER}/24")
        server = DhcpServer(server_ns, tmp_path, "--log-level", "WARNING",
                            "--subnet", f"198.18.0.0/24,pool={POOL[0]}-{POOL[1]}",
                            "--unknown-mac", "discover",
                            "--dhcp-setting", "pending_per_window=16",
                            "--dhcp-setting", "pending_window=4.0")
        try:
            sent = client_ns.run(sys.executable, "-c", SPOOF_SENDER, str(flood), FLOODER,
                                 SERVER_IP, timeout=60)
            assert sent.stdout.strip() == str(MAX_PENDING)
            # A real client that says it is a PXE ROM, asking again and again (bounded).
            client_ns.ip("link", "set", "eth0", "address", PXE_MAC)
            deadline, lease, tries = time.monotonic() + 40, "", 0
            while time.monotonic() < deadline and 'filename "undionly.kpxe"' not in lease:
                tries += 1
                lease = dhclient(client_ns, tmp_path, timeout=8,
                                 conf=f'send vendor-class-identifier "{PXE_VENDOR}";\n')
        finally:
            server.stop()
        log = server.log_text()
        assert 'filename "undionly.kpxe"' in lease, (tries, lease, log[-3000:])
        assert "fixed-address 198.18.0.1" in lease
        db = sqlite3.connect(tmp_path / "registry.sqlite")
        pending = dict(db.execute("SELECT mac, state FROM nodes").fetchall())
        db.close()
        assert pending.get(PXE_MAC) == "pending"
        # The flood was recorded 16 per 4 s window, not 4096 at once.
        assert len(pending) < MAX_PENDING // 8, len(pending)
        print(f"\nspoofed PXE flood: {MAX_PENDING} MACs, {len(pending)} pending nodes; "
              f"the real client booted after {tries} dhclient run(s)")
