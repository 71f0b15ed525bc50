"""The dom0's guest rules (``nodeagent.roles.guestnet``) loaded with the real ``nft`` into a
real bridge, in throwaway namespaces: a "dom0" namespace with the bridge, two "guests" on
veths named as their vifs would be, and a "server" beyond the uplink that is the config
server and a node. Spoofed MACs, addresses and ARP replies reach nothing; the honest guest's
traffic and DHCP keep flowing."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys

import netlab
import pytest
from netlab import namespaces

from nodeagent.roles import guestnet

pytestmark = pytest.mark.netns

MAC_A, MAC_B = "00:16:3e:00:00:01", "00:16:3e:00:00:02"
IP_A, IP_B, SERVER, NODE, OTHER = ("198.18.40.96", "198.18.40.97", "198.18.40.1",
                                   "198.18.40.10", "198.18.40.20")
POLICY = guestnet.Policy(servers=(SERVER,), http_port=8080, protected=(f"{NODE}/32",))
LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
while True:
    c, _ = s.accept()
    c.sendall(b"hello\\n")
    c.close()
"""


def port_of(ns, dom0, mac, ip, vif):
    """A guest namespace on a veth whose dom0 end is named ``vif``, on the bridge."""
    dom0.ip("link", "add", vif, "type", "veth", "peer", "name", "tmp0")
    dom0.ip("link", "set", "tmp0", "netns", ns.name)
    ns.ip("link", "set", "tmp0", "name", "eth0")
    ns.ip("link", "set", "eth0", "address", mac)
    ns.ip("addr", "add", f"{ip}/24", "dev", "eth0")
    ns.ip("link", "set", "eth0", "up")
    dom0.ip("link", "set", vif, "master", "br0")
    dom0.ip("link", "set", vif, "up")


def pings(ns, target, *extra) -> bool:
    done = ns.run("ping", "-c", "1", "-W", "1", *extra, target, check=False, timeout=10)
    return done.returncode == 0


def connects(ns, target, port) -> bool:
    code = ("import socket,sys\ntry:\n s=socket.create_connection((sys.argv[1],"
            "int(sys.argv[2])),timeout=2)\n print(s.recv(10))\nexcept OSError:\n sys.exit(1)")
    return ns.run(sys.executable, "-c", code, target, str(port), check=False,
                  timeout=10).returncode == 0


@contextlib.contextmanager
def guest_lab():
    with namespaces(4, prefix="nbg") as (dom0, guest_a, guest_b, server):
        dom0.ip("link", "add", "br0", "type", "bridge", "forward_delay", "0")
        dom0.ip("link", "set", "br0", "up")
        port_of(guest_a, dom0, MAC_A, IP_A, guestnet.vifname(MAC_A))
        port_of(guest_b, dom0, MAC_B, IP_B, guestnet.vifname(MAC_B))
        dom0.ip("link", "add", "uplink", "type", "veth", "peer", "name", "tmp0")
        dom0.ip("link", "set", "tmp0", "netns", server.name)
        server.ip("link", "set", "tmp0", "name", "eth0")
        for address in (SERVER, NODE, OTHER):
            server.ip("addr", "add", f"{address}/24", "dev", "eth0")
        server.ip("link", "set", "eth0", "up")
        dom0.ip("link", "set", "uplink", "master", "br0")
        dom0.ip("link", "set", "uplink", "up")
        listeners = [server.popen(sys.executable, "-c", LISTENER, str(port))
                     for port in (8080, 8443)]
        try:
            for port in (8080, 8443):  # listening before any test relies on them
                netlab.wait_for(lambda port=port: connects(server, SERVER, port), 30,
                                f"the server's listener on {port}", step=0.3)
            yield dom0, guest_a, guest_b, server
        finally:
            for process in listeners:
                process.kill()
                process.wait()


def load(dom0, tmp_path, text):
    path = tmp_path / "rules.nft"
    path.write_text(text)
    dom0.run("nft", "-f", str(path))


def rules() -> str:
    return guestnet.ruleset(guestnet.ports([
        {"nics": [{"mac": MAC_A, "ip": IP_A}]}, {"nics": [{"mac": MAC_B, "ip": IP_B}]}]),
        POLICY)


def poisoned(guest, server) -> bool:
    """A forged ARP announcement that guest A has B's address: did the server believe it?"""
    server.ip("neigh", "flush", "dev", "eth0")
    guest.ip("addr", "add", f"{IP_B}/32", "dev", "eth0")
    try:
        guest.run("busybox", "arping", "-U", "-c", "2", "-w", "2", "-I", "eth0", "-s", IP_B,
                  IP_B, check=False, timeout=10)
    finally:
        guest.ip("addr", "del", f"{IP_B}/32", "dev", "eth0")
    return MAC_A in server.run("ip", "neigh", "show", IP_B).stdout


def test_guests_send_only_as_themselves_and_reach_only_what_they_may(tmp_path):
    with guest_lab() as (dom0, guest_a, guest_b, server):
        server.run("sysctl", "-q", "net.ipv4.conf.eth0.arp_accept=1")
        # Without the rules (the controls): spoofing works, the API and the node answer.
        guest_a.ip("addr", "add", "198.18.40.99/24", "dev", "eth0")
        assert pings(guest_a, OTHER, "-I", "198.18.40.99")
        assert connects(guest_a, SERVER, 8443) and pings(guest_a, NODE)
        assert poisoned(guest_a, server)
        load(dom0, tmp_path, rules())
        load(dom0, tmp_path, rules())  # again: replaced whole, not added to
        # Honest: to the other guest, to the world beyond, to the server's HTTP boot port.
        assert pings(guest_a, IP_B, "-I", IP_A) and pings(guest_b, IP_A)
        assert pings(guest_a, OTHER, "-I", IP_A) and connects(guest_a, SERVER, 8080)
        # Not to the server's API, nor ping it, nor any protected node; but what those open
        # to the guest is answered (the operator's ping and ssh).
        assert not connects(guest_a, SERVER, 8443) and not pings(guest_a, SERVER)
        assert not pings(guest_a, NODE) and not connects(guest_a, NODE, 8080)
        assert pings(server, IP_A, "-I", SERVER) and pings(server, IP_A, "-I", NODE)
        listener = guest_a.popen(sys.executable, "-c", LISTENER, "2222")
        try:
            assert netlab.wait_for(lambda: connects(server, IP_A, 2222), 10,
                                   "the guest's listener", step=0.5)
        finally:
            listener.kill()
            listener.wait()
        # Another source address (one of its own making, or the other guest's) reaches
        # nothing, and a forged ARP poisons nobody.
        assert not pings(guest_a, IP_B, "-I", "198.18.40.99")
        assert not pings(guest_a, OTHER, "-I", "198.18.40.99")
        guest_a.ip("addr", "add", f"{IP_B}/32", "dev", "eth0")
        assert not pings(guest_a, OTHER, "-I", IP_B)
        guest_a.ip("addr", "del", f"{IP_B}/32", "dev", "eth0")
        assert not poisoned(guest_a, server)
        # Another MAC: nothing passes at all, and the other guest is unaffected.
        guest_a.ip("link", "set", "eth0", "address", "00:16:3e:00:00:99")
        assert not pings(guest_a, OTHER, "-I", IP_A) and not pings(guest_a, IP_B, "-I", IP_A)
        assert pings(guest_b, OTHER)
        guest_a.ip("link", "set", "eth0", "address", MAC_A)
        assert pings(guest_a, OTHER, "-I", IP_A)
        listed = dom0.run("nft", "list", "table", "bridge", guestnet.TABLE).stdout
        assert re.search(r"@port_mac counter packets [1-9]", listed), listed
        assert re.search(r"@port_ip counter packets [1-9]", listed), listed


def udhcpd(ns, tmp_path, name, first, static=""):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "udhcpd.leases").touch()
    (folder / "udhcpd.conf").write_text(
        f"start {first}\nend {first[:-2]}99\ninterface eth0\n"
        f"lease_file {folder / 'udhcpd.leases'}\noption subnet 255.255.255.0\n{static}")
    return ns.popen("busybox", "udhcpd", "-f", str(folder / "udhcpd.conf"),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def lease(guest, tmp_path) -> str:
    conf, leases = tmp_path / "dhclient.conf", tmp_path / "dhclient.leases"
    conf.write_text("timeout 6;\nretry 1;\n")
    leases.write_text("")
    guest.ip("addr", "flush", "dev", "eth0")
    guest.run("dhclient", "-1", "-sf", "/bin/true", "-cf", str(conf), "-lf", str(leases),
              "-pf", str(tmp_path / "dhclient.pid"), "eth0", check=False, timeout=30)
    guest.run("dhclient", "-x", "-sf", "/bin/true", "-lf", str(leases),
              "-pf", str(tmp_path / "dhclient.pid"), "eth0", check=False, timeout=15)
    return leases.read_text()


def test_dhcp_from_our_server_passes_and_a_guest_playing_server_does_not(tmp_path):
    with guest_lab() as (dom0, guest_a, guest_b, server):
        rogue = udhcpd(guest_b, tmp_path, "rogue", "198.18.40.50")
        try:
            got = lease(guest_a, tmp_path)  # the control: without rules the rogue answers
            assert f"dhcp-server-identifier {IP_B}" in got, got
            load(dom0, tmp_path, rules())
            assert "dhcp-server-identifier" not in lease(guest_a, tmp_path)
            ours = udhcpd(server, tmp_path, "ours", "198.18.40.150",
                          static=f"static_lease {MAC_A} {IP_A}\n")
            try:
                got = lease(guest_a, tmp_path)
                assert f"dhcp-server-identifier {SERVER}" in got and f"fixed-address {IP_A}" in got
                assert IP_B not in got
            finally:
                ours.kill()
                ours.wait()
        finally:
            rogue.kill()
            rogue.wait()


SNIFF = """
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind(("eth0", 0))
s.settimeout(0.2)
end, source, seen = time.time() + float(sys.argv[1]), socket.inet_aton(sys.argv[2]), 0
print("ready", flush=True)
while time.time() < end:
    try:
        frame = s.recv(4096)
    except socket.timeout:
        continue
    if frame[14 + 12:14 + 16] == source and frame[14 + 9] in (6, 17):
        seen += 1
print(seen, flush=True)
"""
SEND = """
import socket, struct, sys
kind, source, target = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "fragments":  # a SYN to target:8443 split so that no fragment holds both
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    tcp = struct.pack("!HHIIBBHHH", 40000, 8443, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    for flags, piece in ((0x2000, tcp[:8]), (1, tcp[8:])):
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(piece), 4242, flags, 64, 6,
                             0, socket.inet_aton(source), socket.inet_aton(target))
        raw.sendto(header + piece, (target, 0))
else:  # UDP: a DHCP answer from another port than 67, or multicast
    port, to = {"offer": (6767, 68), "multicast": (5353, 5353)}[kind]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.bind((source, port))
    for _ in range(3):
        s.sendto(b"x" * 300, (target, to))
"""


def arrived(guest, server, kind, source, target) -> int:
    """How many of ``kind``'s frames from ``source`` the server's NIC saw."""
    sniffer = server.popen(sys.executable, "-c", SNIFF, "3", source, stdout=subprocess.PIPE,
                           text=True)
    try:
        assert sniffer.stdout.readline().strip() == "ready"
        guest.run(sys.executable, "-c", SEND, kind, source, target)
        return int(sniffer.communicate(timeout=15)[0].strip())
    finally:
        if sniffer.poll() is None:
            sniffer.kill()
            sniffer.wait()


def test_fragments_broadcasts_and_dhcp_answers_reach_nobody(tmp_path):
    """What the stateless rules cannot judge by its ports (a SYN split in fragments), a DHCP
    answer sent from another port than 67, multicast: each reaches the server without the
    rules (the control) and not with them."""
    cases = (("fragments", IP_A, SERVER), ("offer", IP_A, "255.255.255.255"),
             ("multicast", IP_A, "224.0.0.251"))
    with guest_lab() as (dom0, guest_a, _guest_b, server):
        for kind, source, target in cases:
            assert arrived(guest_a, server, kind, source, target) >= 2, kind
        load(dom0, tmp_path, rules())
        for kind, source, target in cases:
            assert arrived(guest_a, server, kind, source, target) == 0, kind
        assert pings(guest_a, OTHER, "-I", IP_A) and connects(guest_a, SERVER, 8080)
