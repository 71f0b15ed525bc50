"""ProxyDHCP beside dnsmasq: the address comes from dnsmasq, the boot information from us.

Four namespaces on one bridge: ``lan`` holds the bridge, ``server`` runs our DHCP service in
proxy mode, ``dnsmasq`` is the network's DHCP server, and ``client`` runs a PXE client written
for this test (``PXE_CLIENT``: the exchange an iPXE or PXE ROM performs, on a real UDP socket):
DISCOVER with PXE options, REQUEST to dnsmasq, then the ProxyDHCP REQUEST to our port 4011.
"""

from __future__ import annotations

import json
import subprocess
import sys

import netlab
import pytest
from netlab import namespaces, veth_pair
from test_dhcp_clients import NODE_MAC, SERVER_IP, DhcpServer, dhclient

pytestmark = pytest.mark.netns

DNSMASQ_IP = "198.18.0.2"
HTTP_BASE = f"http://{SERVER_IP}:8080"

PXE_CLIENT = r'''
import json, socket, subprocess, sys, time
from configserver.dhcp import codec
from configserver.dhcp.codec import DhcpPacket, MessageType

mac = bytes.fromhex(sys.argv[1].replace(":", ""))
vendor, user_class = sys.argv[2].encode(), sys.argv[3].encode()
pxe = {60: vendor, 93: b"\0\0", 94: b"\x01\x02\x01", 97: b"\0" + bytes(range(16))}
if user_class:
    pxe[77] = user_class

def sock(address, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0\0")
    s.bind((address, port))
    s.settimeout(0.5)
    return s

def collect(s, xid, seconds):
    replies, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data, addr = s.recvfrom(4096)
        except socket.timeout:
            continue
        packet = codec.decode(data)
        if packet.xid == xid and packet.op == 2:
            replies.append(packet)
    return replies

def summary(p):
    return {"type": int(p.message_type or 0), "yiaddr": p.yiaddr, "siaddr": p.siaddr,
            "server": p.ip_option(54), "file": p.file.decode(),
            "bootfile": (p.options.get(67) or b"").decode(),
            "vendor": (p.options.get(60) or b"").decode(),
            "pxe43": (p.options.get(43) or b"").hex()}

def exchange(s, packet, dest, done, tries=4, window=2.0):
    """Send until ``done(replies)`` holds (a loaded host may be slow to answer)."""
    replies = []
    for _ in range(tries):
        s.sendto(codec.encode(packet), dest)
        replies += collect(s, packet.xid, window)
        if done(replies):
            break
    return replies

s = sock("0.0.0.0", 68)
discover = DhcpPacket(op=1, xid=0x5eed, chaddr=mac, flags=codec.BROADCAST_FLAG,
                      options={53: bytes((MessageType.DISCOVER,)),
                               55: bytes((1, 3, 43, 60, 66, 67)),
                               57: (1472).to_bytes(2, "big"), **pxe})
want_servers = set(sys.argv[5].split(","))
offers = exchange(s, discover, ("255.255.255.255", 67),
                  lambda r: want_servers <= {p.ip_option(54) for p in r}, window=3.0)
print(json.dumps({"offers": [summary(p) for p in offers]}), flush=True)
lease_offer = next((p for p in offers if p.yiaddr != "0.0.0.0"), None)
if lease_offer is None:
    sys.exit(0)
request = DhcpPacket(op=1, xid=0x5eee, chaddr=mac, flags=codec.BROADCAST_FLAG,
                     options={53: bytes((MessageType.REQUEST,)),
                              50: socket.inet_aton(lease_offer.yiaddr),
                              54: lease_offer.options[54], **pxe})
acks = exchange(s, request, ("255.255.255.255", 67),
                lambda r: any(p.message_type == MessageType.ACK for p in r))
print(json.dumps({"acks": [summary(p) for p in acks]}), flush=True)
address = next(p.yiaddr for p in acks if p.message_type == MessageType.ACK)
subprocess.run(["ip", "addr", "add", address + "/24", "dev", "eth0"], check=True)
time.sleep(0.5)
proxy = sock(address, 68)
ask = DhcpPacket(op=1, xid=0x5eef, chaddr=mac, ciaddr=address,
                 options={53: bytes((MessageType.REQUEST,)), **pxe})
answers = exchange(proxy, ask, (sys.argv[4], 4011), lambda r: bool(r))
print(json.dumps({"proxy": [summary(p) for p in answers]}), flush=True)
'''


def run_pxe_client(ns, vendor: str, user_class: str = "",
                   servers: str = f"{SERVER_IP},{DNSMASQ_IP}") -> dict:
    result = ns.run(sys.executable, "-c", PXE_CLIENT, NODE_MAC, vendor, user_class, SERVER_IP,
                    servers, check=False, timeout=90)
    seen: dict = {}
    for line in result.stdout.splitlines():
        seen.update(json.loads(line))
    seen["stderr"] = result.stderr
    return seen


@pytest.fixture
def lan(tmp_path):
    with namespaces(4, "nbpxy") as (lan_ns, server_ns, dnsmasq_ns, client_ns):
        lan_ns.ip("link", "add", "br0", "type", "bridge")
        lan_ns.ip("link", "set", "br0", "up")
        for index, (ns, addr) in enumerate(((server_ns, f"{SERVER_IP}/24"),
                                            (dnsmasq_ns, f"{DNSMASQ_IP}/24"),
                                            (client_ns, ""))):
            veth_pair(lan_ns, ns, "", addr, name_a=f"port{index}", name_b="eth0")
            lan_ns.ip("link", "set", f"port{index}", "master", "br0")
        client_ns.ip("link", "set", "eth0", "address", NODE_MAC)
        dnsmasq = dnsmasq_ns.popen(
            "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--interface=eth0",
            "--bind-interfaces", "--dhcp-range=198.18.0.100,198.18.0.150,255.255.255.0,1h",
            f"--dhcp-leasefile={tmp_path / 'dnsmasq.leases'}",
            f"--pid-file={tmp_path / 'dnsmasq.pid'}", "--dhcp-authoritative",
            stdout=(tmp_path / "dnsmasq.log").open("w"), stderr=subprocess.STDOUT)
        server = DhcpServer(server_ns, tmp_path, "--mode", "proxy", "--http-base", HTTP_BASE,
                            "--node", f"{NODE_MAC},,pxe-node")
        try:
            yield client_ns, server, tmp_path
        finally:
            server.stop()
            netlab.stop(dnsmasq)


def test_firmware_pxe_gets_address_from_dnsmasq_and_boot_file_from_us(lan):
    client_ns, server, _ = lan
    seen = run_pxe_client(client_ns, "PXEClient:Arch:00000:UNDI:002001")
    offers = seen.get("offers", [])
    ours = [o for o in offers if o["server"] == SERVER_IP]
    theirs = [o for o in offers if o["server"] == DNSMASQ_IP]
    assert ours and theirs, (seen, server.log_text())
    assert ours[0]["yiaddr"] == "0.0.0.0"
    assert ours[0]["file"] == ours[0]["bootfile"] == "undionly.kpxe"
    assert ours[0]["siaddr"] == SERVER_IP
    assert ours[0]["vendor"] == "PXEClient"
    assert ours[0]["pxe43"] == "060108ff"
    assert theirs[0]["yiaddr"].startswith("198.18.0.1")
    assert {a["server"] for a in seen["acks"] if a["type"] == 5} == {DNSMASQ_IP}, seen
    proxy = seen["proxy"]
    assert proxy and proxy[0]["type"] == 5 and proxy[0]["yiaddr"] == "0.0.0.0"
    assert proxy[0]["bootfile"] == "undionly.kpxe"


def test_ipxe_gets_its_boot_script_url_from_the_proxy(lan):
    client_ns, server, _ = lan
    seen = run_pxe_client(client_ns, "PXEClient:Arch:00000:UNDI:002001", "iPXE")
    url = f"{HTTP_BASE}/boot/{NODE_MAC}.ipxe"
    ours = [o for o in seen.get("offers", []) if o["server"] == SERVER_IP]
    assert ours and ours[0]["bootfile"] == url, (seen, server.log_text())
    assert seen.get("proxy"), seen
    assert seen["proxy"][0]["bootfile"] == url
    assert seen["proxy"][0]["vendor"] == "PXEClient"


def test_non_pxe_client_gets_only_dnsmasqs_answer(lan):
    client_ns, server, tmp_path = lan
    lease = dhclient(client_ns, tmp_path)
    assert "fixed-address 198.18.0.1" in lease
    assert f"option dhcp-server-identifier {DNSMASQ_IP};" in lease
    assert server.stop() == "answered=0 dropped=0"
