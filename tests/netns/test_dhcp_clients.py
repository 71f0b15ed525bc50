"""Real DHCP clients (dhclient, udhcpc) against our server, each side in its own namespace.

The server runs as ``bench/dhcp/serve.py`` (the DHCP service on a fresh registry) in the server
namespace, bound to its veth end with SO_BINDTODEVICE. ``DhcpServer`` is shared with the other
netns DHCP tests.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import select
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import Netns, namespaces, veth_pair

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
SERVE = REPO / "bench" / "dhcp" / "serve.py"
SERVER_IP = "198.18.0.1"
NODE_MAC = "52:54:00:0a:00:01"
NODE_IP = "198.18.0.50"
STRANGER_MAC = "52:54:00:0a:00:99"
POOL = ("198.18.0.100", "198.18.0.199")
SUBNET = (f"198.18.0.0/24,pool={POOL[0]}-{POOL[1]},router={SERVER_IP},dns={SERVER_IP},"
          "lease=600,domain=rack.test,mtu=1400")
REQUEST_ALL = ("request subnet-mask, broadcast-address, routers, domain-name, "
               "domain-name-servers, host-name, interface-mtu;\n")


class DhcpServer:
    """bench/dhcp/serve.py in a namespace; stops it (and shows its log) on exit."""

    def __init__(self, ns: Netns, state_dir: Path, *args: str) -> None:
        self.log = state_dir / "server.log"
        # This checkout's configserver, whatever the venv's editable install points at.
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = ns.popen(
            sys.executable, str(SERVE), "--state-dir", str(state_dir), "--interface", "eth0",
            "--server-address", SERVER_IP, *args,
            stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True, env=env)
        self._wait_ready(20)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if ready:
                line = self.process.stdout.readline()
                if line.strip() == "READY":
                    return
                if not line:
                    break
        self.stop()
        raise AssertionError(f"DHCP server did not start:\n{self.log.read_text()}")

    def stop(self) -> str:
        """Stop the server; return its last stdout line (answered=N dropped=M)."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            out, _ = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        return out.strip().splitlines()[-1] if out.strip() else ""

    def log_text(self) -> str:
        return self.log.read_text()


@contextlib.contextmanager
def server_and_client(tmp_path: Path, *args: str,
                      client_mac: str = NODE_MAC) -> Iterator[tuple[DhcpServer, Netns]]:
    with namespaces(2, "nbdhcp") as (server_ns, client_ns):
        veth_pair(server_ns, client_ns, f"{SERVER_IP}/24", "")
        client_ns.ip("link", "set", "eth0", "address", client_mac)
        server = DhcpServer(server_ns, tmp_path, *args)
        try:
            yield server, client_ns
        finally:
            server.stop()


def dhclient(ns: Netns, tmp_path: Path, *, conf: str = "", timeout: int = 20) -> str:
    """Run dhclient once (-1) with its own lease/pid files; return the lease file text."""
    conf_file = tmp_path / "dhclient.conf"
    conf_file.write_text(f"timeout {timeout};\nretry 1;\n{conf}")
    leases = tmp_path / "dhclient.leases"
    leases.unlink(missing_ok=True)
    leases.touch()
    ns.run("dhclient", "-1", "-v", "-sf", "/bin/true", "-cf", str(conf_file),
           "-lf", str(leases), "-pf", str(tmp_path / "dhclient.pid"), "eth0",
           check=False, timeout=timeout + 15)
    ns.run("dhclient", "-x", "-sf", "/bin/true", "-lf", str(leases),
           "-pf", str(tmp_path / "dhclient.pid"), "eth0", check=False, timeout=15)
    return leases.read_text()


def udhcpc(ns: Netns, tmp_path: Path) -> dict[str, str]:
    """Run udhcpc once; return the environment its script saw on ``bound``."""
    env_file = tmp_path / "udhcpc.env"
    env_file.unlink(missing_ok=True)
    script = tmp_path / "udhcpc.sh"
    script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && env > {env_file}\nexit 0\n')
    script.chmod(0o755)
    ns.run("udhcpc", "-f", "-q", "-n", "-i", "eth0", "-s", str(script), "-t", "4", "-T", "2",
           "-O", "hostname", check=False, timeout=30)
    if not env_file.exists():
        return {}
    return dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)


def test_dhclient_gets_reserved_address_hostname_and_router(tmp_path):
    with server_and_client(tmp_path, "--subnet", SUBNET,
                           "--node", f"{NODE_MAC},{NODE_IP},storage-7") as (server, client):
        lease = dhclient(client, tmp_path, conf=REQUEST_ALL)
        assert f"fixed-address {NODE_IP};" in lease, server.log_text()
        assert 'option host-name "storage-7";' in lease
        assert f"option routers {SERVER_IP};" in lease
        assert f"option dhcp-server-identifier {SERVER_IP};" in lease
        assert "option dhcp-lease-time 600;" in lease
        assert 'option domain-name "rack.test";' in lease
        assert "option interface-mtu 1400;" in lease
        # The lease is in the server's store after a restart.
        assert server.stop().startswith("answered=")
        with contextlib.closing(sqlite3.connect(tmp_path / "leases.sqlite")) as db:
            rows = db.execute("SELECT mac, ip, state FROM leases").fetchall()
        assert (NODE_MAC, NODE_IP, "bound") in rows


def test_udhcpc_gets_reserved_address_hostname_and_router(tmp_path):
    with server_and_client(tmp_path, "--subnet", SUBNET,
                           "--node", f"{NODE_MAC},{NODE_IP},storage-8") as (server, client):
        env = udhcpc(client, tmp_path)
        assert env.get("ip") == NODE_IP, server.log_text()
        assert env.get("hostname") == "storage-8"
        assert env.get("router") == SERVER_IP
        assert env.get("subnet") == "255.255.255.0"
        assert env.get("serverid") == SERVER_IP


def test_unknown_mac_gets_a_pool_address_in_full_mode(tmp_path):
    with server_and_client(tmp_path, "--subnet", SUBNET, "--node", f"{NODE_MAC},{NODE_IP},n1",
                           client_mac=STRANGER_MAC) as (server, client):
        lease = dhclient(client, tmp_path)
        fixed = [line.split()[1].rstrip(";") for line in lease.splitlines()
                 if "fixed-address" in line]
        assert fixed, server.log_text()
        address = ipaddress.IPv4Address(fixed[0])
        assert ipaddress.IPv4Address(POOL[0]) <= address <= ipaddress.IPv4Address(POOL[1])
        assert "host-name" not in lease


def test_renewal_after_server_restart_keeps_the_pool_address(tmp_path):
    with namespaces(2, "nbdhcp") as (server_ns, client_ns):
        veth_pair(server_ns, client_ns, f"{SERVER_IP}/24", "")
        client_ns.ip("link", "set", "eth0", "address", STRANGER_MAC)
        first = DhcpServer(server_ns, tmp_path, "--subnet", SUBNET)
        try:
            env = udhcpc(client_ns, tmp_path)
        finally:
            first.stop()
        assert env.get("ip"), first.log_text()
        # After a restart another client asks first: the durable store still holds our
        # client's address, so the newcomer gets a different one and ours gets its own back.
        second = DhcpServer(server_ns, tmp_path, "--subnet", SUBNET)
        try:
            client_ns.ip("link", "set", "eth0", "address", "52:54:00:0a:00:98")
            newcomer = udhcpc(client_ns, tmp_path)
            client_ns.ip("link", "set", "eth0", "address", STRANGER_MAC)
            again = udhcpc(client_ns, tmp_path)
        finally:
            second.stop()
        assert newcomer.get("ip") and newcomer["ip"] != env["ip"], second.log_text()
        assert again.get("ip") == env["ip"], second.log_text()


def test_proxy_mode_ignores_non_pxe_clients(tmp_path):
    with server_and_client(tmp_path, "--mode", "proxy",
                           "--node", f"{NODE_MAC},,n1") as (server, client):
        lease = dhclient(client, tmp_path, timeout=6)
        assert "fixed-address" not in lease
        assert server.stop() == "answered=0 dropped=0"


def test_dhclient_release_frees_the_lease(tmp_path):
    with server_and_client(tmp_path, "--subnet", SUBNET,
                           client_mac=STRANGER_MAC) as (server, client):
        conf = tmp_path / "dhclient.conf"
        conf.write_text("timeout 20;\nretry 1;\n")
        files = ["-sf", "/bin/true", "-cf", str(conf), "-lf", str(tmp_path / "rel.leases"),
                 "-pf", str(tmp_path / "rel.pid")]
        client.run("dhclient", "-1", *files, "eth0", timeout=40)
        address = re.search(r"fixed-address ([0-9.]+);", (tmp_path / "rel.leases").read_text())
        assert address, server.log_text()
        # -sf /bin/true configured nothing; the RELEASE goes by unicast from the leased address.
        client.ip("addr", "add", f"{address[1]}/24", "dev", "eth0")
        client.run("dhclient", "-r", *files, "eth0", timeout=20)
        summary = server.stop()
        assert summary == "answered=2 dropped=0", server.log_text()
        with contextlib.closing(sqlite3.connect(tmp_path / "leases.sqlite")) as db:
            rows = db.execute("SELECT mac, state FROM leases").fetchall()
        assert rows == [(STRANGER_MAC, "released")], server.log_text()
