"""The long fuzz run (issue 13): random and mutated datagrams at a running ``configserver serve``.

A sender in the client namespace sends mutations of captured and encoded DHCP DISCOVERs,
REQUESTs and INFORMs and of TFTP RRQs, plus random bytes, to ports 67, 4011 and 69; meanwhile
the server's RSS is sampled from /proc. Afterwards a real dhclient and tftp-hpa's client must be
answered at once, and the RSS must have stayed flat.

The size: NETBOOT_FUZZ_DATAGRAMS (default 60000, a few seconds; the full run is 1000000),
sent at NETBOOT_FUZZ_RATE per second (default 20000), and never longer than
NETBOOT_FUZZ_SECONDS (default 240): the sender stops at whichever comes first and reports the
count it reached.
"""

from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import netlab
import pytest
from netlab import namespaces, veth_pair
from test_dhcp_clients import NODE_IP, NODE_MAC, SERVER_IP, dhclient

from configserver.dhcp import codec
from configserver.dhcp.codec import DhcpPacket, MessageType
from configserver.model import NodeSpec
from configserver.registry.sqlite import SqliteRegistry

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
IPXE_DIR = Path("/usr/lib/ipxe")
CLIENT_IP = "198.18.0.2"  # the real clients' address
FUZZ_IP = "198.18.0.3"  # the sender's: TFTP limits transfers per client address
DATAGRAMS = int(os.environ.get("NETBOOT_FUZZ_DATAGRAMS", "60000"))
RATE = int(os.environ.get("NETBOOT_FUZZ_RATE", "20000"))
SECONDS = float(os.environ.get("NETBOOT_FUZZ_SECONDS", "240"))
# RSS bound: after the first tenth of the run (caches and buffers warmed up), the server may
# grow by at most this much more.
RSS_GROWTH_MIB = 24

SENDER = r"""
import json, random, socket, sys, time
spec = json.load(open(sys.argv[1]))
seeds = [(bytes.fromhex(h), ports) for h, ports in spec["seeds"]]
count, rate, deadline = spec["count"], spec["rate"], time.monotonic() + spec["seconds"]
rng = random.Random(spec["seed"])
socks = []
for _ in range(8):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    s.bind((spec["source"], 0))
    socks.append(s)
TOKENS = [b"\x00", b"\xff", b"\x35\x01\x01", b"\x63\x82\x53\x63", b"blksize\x00",
          b"windowsize\x00", b"octet\x00", b"../", b"\x3c\x09PXEClient"]

def mutate(data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(7)
        if op == 0 and data:      # flip bits
            i = rng.randrange(len(data)); data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and data:    # a random byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 2:             # truncate
            del data[rng.randrange(len(data) + 1):]
        elif op == 3:             # insert a token
            i = rng.randrange(len(data) + 1); data[i:i] = rng.choice(TOKENS)
        elif op == 4 and data:    # duplicate a slice
            i = rng.randrange(len(data)); j = min(len(data), i + rng.randint(1, 64))
            data[i:i] = data[i:j] * rng.randint(1, 8)
        elif op == 5:             # an option length / size field set to an extreme
            if len(data) > 4:
                i = rng.randrange(len(data) - 1); data[i:i + 2] = rng.choice(
                    [b"\xff\xff", b"\x00\x00", b"\x00\xff", b"\x7f\x00"])
        else:                     # random chaddr-like block
            i = rng.randrange(len(data) + 1); data[i:i + 6] = rng.randbytes(6)
    return bytes(data[:1500])

sent = 0
started = time.monotonic()
while sent < count and time.monotonic() < deadline:
    for _ in range(100):
        if rng.random() < 0.1:
            data, port = rng.randbytes(rng.randrange(1, 700)), rng.choice((67, 4011, 69))
        else:
            seed, ports = rng.choice(seeds)
            data, port = mutate(seed), rng.choice(ports)
        try:
            rng.choice(socks).sendto(data, (spec["server"], port))
        except OSError:
            pass
        sent += 1
    ahead = sent / rate - (time.monotonic() - started)
    if ahead > 0:
        time.sleep(ahead)
print(json.dumps({"sent": sent, "seconds": time.monotonic() - started}))
"""


def captured_discovers() -> list[bytes]:
    """The captured DISCOVERs of the codec tests (dhclient, udhcpc, perfdhcp)."""
    path = REPO / "tests" / "unit" / "test_dhcp_codec.py"
    spec = importlib.util.spec_from_file_location("captures_for_fuzz", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [module.DHCLIENT_DISCOVER, module.UDHCPC_DISCOVER, module.PERFDHCP_DISCOVER]


def encoded(kind: MessageType, options: dict[int, bytes], **fields) -> bytes:
    return codec.encode(DhcpPacket(op=1, xid=0x5eed, chaddr=bytes.fromhex("525400c0ffee"),
                                   options={53: bytes((kind,)), **options}, **fields))


def seeds() -> list[tuple[str, list[int]]]:
    server = ipaddress.IPv4Address(SERVER_IP).packed
    pxe = {60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\0\0", 97: bytes(17)}
    dhcp = [*captured_discovers(),
            encoded(MessageType.DISCOVER, pxe),
            encoded(MessageType.DISCOVER, {**pxe, 77: b"iPXE"}),
            encoded(MessageType.REQUEST, {50: ipaddress.IPv4Address("198.18.0.150").packed,
                                          54: server}),
            encoded(MessageType.REQUEST, {}, ciaddr="198.18.0.150"),
            encoded(MessageType.INFORM, pxe, ciaddr=CLIENT_IP),
            encoded(MessageType.DISCOVER, pxe, giaddr="198.19.0.1")]
    tftp = [b"\x00\x01undionly.kpxe\x00octet\x00",
            b"\x00\x01ipxe.efi\x00octet\x00blksize\x001468\x00tsize\x000\x00windowsize\x008\x00",
            b"\x00\x01images/storage/vmlinuz\x00netascii\x00",
            b"\x00\x02undionly.kpxe\x00octet\x00", b"\x00\x04\x00\x01", b"\x00\x05\x00\x01x\x00"]
    return ([(d.hex(), [67, 4011]) for d in dhcp] + [(t.hex(), [69]) for t in tftp])


def udp_counters(ns) -> dict[str, int]:
    """The namespace's UDP counters (/proc/net/snmp): datagrams taken in, buffer overflows."""
    lines = [line.split() for line in ns.run("cat", "/proc/net/snmp").stdout.splitlines()
             if line.startswith("Udp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.skipif(not (IPXE_DIR / "undionly.kpxe").exists(), reason="Debian ipxe missing")
def test_fuzzed_datagrams_leave_serve_answering_and_flat(tmp_path):
    state = tmp_path / "state"
    registry = SqliteRegistry(state / "registry.sqlite")
    registry.add_node(NodeSpec(mac=NODE_MAC, role="storage", hostname="fuzz-1", ip=NODE_IP))
    registry.close()
    spec = tmp_path / "fuzz.json"
    spec.write_text(json.dumps({"seeds": seeds(), "count": DATAGRAMS, "rate": RATE,
                                "seconds": SECONDS, "seed": 13, "server": SERVER_IP,
                                "source": FUZZ_IP}))
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with namespaces(2, "nbfuzz") as (server_ns, client_ns):
        veth_pair(server_ns, client_ns, f"{SERVER_IP}/24", f"{CLIENT_IP}/24")
        client_ns.ip("addr", "add", f"{FUZZ_IP}/24", "dev", "eth0")
        with log.open("w") as out:
            server = server_ns.popen(
                sys.executable, "-m", "configserver", "serve", "--state-dir", str(state),
                "--interface", "eth0", "--http-port", "18069", "--dhcp", "full",
                "--pool", "198.18.0.100-198.18.0.199", "--tftp", "on",
                "--ipxe-dir", str(IPXE_DIR), stdout=out, stderr=subprocess.STDOUT,
                cwd=REPO, env=env)
        try:
            netlab.wait_for((state / "server.json").exists, 30, "configserver serve",
                            process=server, log=log)
            before = udp_counters(server_ns)
            sender = client_ns.popen(sys.executable, "-c", SENDER, str(spec),
                                     stdout=subprocess.PIPE, text=True)
            samples = [rss_kib(server.pid)]
            while sender.poll() is None:
                time.sleep(0.25)
                samples.append(rss_kib(server.pid))
                assert server.poll() is None, log.read_text()[-3000:]
            report = json.loads(sender.stdout.read())
            after = udp_counters(server_ns)
            # Right afterwards: a real DHCP client and a real TFTP client are answered.
            client_ns.ip("link", "set", "eth0", "address", NODE_MAC)
            lease = dhclient(client_ns, tmp_path, timeout=15)
            target = tmp_path / "undionly.kpxe"
            fetched = client_ns.run("tftp", "-m", "binary", SERVER_IP, "-c", "get",
                                    "undionly.kpxe", str(target), check=False, timeout=30)
            samples.append(rss_kib(server.pid))
        finally:
            netlab.stop(server, 15)
    text = log.read_text()
    warm = samples[max(1, len(samples) // 10)]
    print(f"\nfuzz: {report['sent']} datagrams in {report['seconds']:.1f} s; "
          f"RSS start {samples[0]} KiB, after a tenth {warm} KiB, max {max(samples)} KiB, "
          f"end {samples[-1]} KiB ({len(samples)} samples); server namespace UDP: "
          f"{after['InDatagrams'] - before['InDatagrams']} datagrams delivered to its sockets, "
          f"{after['RcvbufErrors'] - before['RcvbufErrors']} lost to full buffers, "
          f"{after['NoPorts'] - before['NoPorts']} to closed ports")
    assert report["sent"] == DATAGRAMS or report["seconds"] >= SECONDS * 0.95, report
    assert f"fixed-address {NODE_IP};" in lease, (lease, text[-3000:])
    assert fetched.returncode == 0 and target.exists(), (fetched.stdout, fetched.stderr)
    assert target.stat().st_size > 0, (fetched.stdout, fetched.stderr, text[-2000:])
    assert (hashlib.sha256(target.read_bytes()).digest()
            == hashlib.sha256((IPXE_DIR / "undionly.kpxe").read_bytes()).digest())
    assert max(samples) - warm <= RSS_GROWTH_MIB * 1024, samples
    assert "Traceback" not in text, text[-5000:]
    assert server.returncode == 0, text[-3000:]
