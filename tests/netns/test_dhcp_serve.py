"""The real ``configserver serve --dhcp full|proxy`` answers real clients in a namespace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import netlab
import pytest
from netlab import Netns, namespaces, veth_pair
from test_dhcp_clients import NODE_IP, NODE_MAC, SERVER_IP, STRANGER_MAC, udhcpc
from test_dhcp_proxy import PXE_CLIENT

from configserver.model import NodeSpec
from configserver.registry.sqlite import SqliteRegistry

pytestmark = pytest.mark.netns

HTTP_PORT = 18067
CONFIGSERVER = Path(sys.executable).with_name("configserver")


def start_serve(ns: Netns, state: Path, *args: str) -> subprocess.Popen:
    log = state / "serve.log"
    process = ns.popen(str(CONFIGSERVER), "-v", "serve", "--state-dir", str(state),
                       "--interface", "eth0", "--http-port", str(HTTP_PORT), "--tftp", "off",
                       *args, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        # server.json is written once DHCP (and TFTP, if on) are serving.
        netlab.wait_for((state / "server.json").exists, 30, "configserver serve to start",
                        process=process, log=log)
    except AssertionError:
        netlab.stop(process)
        raise
    return process


def register(state: Path) -> None:
    registry = SqliteRegistry(state / "registry.sqlite")
    registry.add_node(NodeSpec(mac=NODE_MAC, role="storage", hostname="served-1", ip=NODE_IP))
    registry.close()


def test_serve_full_mode_reservation_pool_and_ipxe(tmp_path):
    register(tmp_path)
    with namespaces(2, "nbserve") as (server_ns, client_ns):
        veth_pair(server_ns, client_ns, f"{SERVER_IP}/24", "")
        client_ns.ip("link", "set", "eth0", "address", NODE_MAC)
        server = start_serve(server_ns, tmp_path, "--dhcp", "full",
                             "--pool", "198.18.0.100-198.18.0.120")
        try:
            env = udhcpc(client_ns, tmp_path)
            assert env.get("ip") == NODE_IP, (tmp_path / "serve.log").read_text()
            assert env.get("hostname") == "served-1"
            assert env.get("router") == SERVER_IP
            client_ns.ip("link", "set", "eth0", "address", STRANGER_MAC)
            stranger = udhcpc(client_ns, tmp_path)
            assert stranger.get("ip", "").startswith("198.18.0.1")
            assert 100 <= int(stranger["ip"].rsplit(".", 1)[1]) <= 120
        finally:
            netlab.stop(server, 15)
        registry = SqliteRegistry(tmp_path / "registry.sqlite")
        try:
            stages = [e.stage for e in registry.events(NODE_MAC)]
        finally:
            registry.close()
        assert "dhcp.discover" in stages and "dhcp.ack" in stages


def test_serve_proxy_mode_answers_ipxe_with_its_script_url(tmp_path):
    register(tmp_path)
    with namespaces(2, "nbserve") as (server_ns, client_ns):
        veth_pair(server_ns, client_ns, f"{SERVER_IP}/24", "")
        client_ns.ip("link", "set", "eth0", "address", NODE_MAC)
        server = start_serve(server_ns, tmp_path, "--dhcp", "proxy")
        try:
            # No other DHCP server here: the client only sees our ProxyDHCP offer and stops
            # before the REQUEST; that offer is what this test is about.
            result = client_ns.run(sys.executable, "-c", PXE_CLIENT, NODE_MAC,
                                   "PXEClient:Arch:00000:UNDI:002001", "iPXE", SERVER_IP,
                                   SERVER_IP, check=False, timeout=90)
        finally:
            netlab.stop(server, 15)
        offers = json.loads(result.stdout.splitlines()[0])["offers"]
        assert offers, (result.stderr, (tmp_path / "serve.log").read_text())
        assert offers[0]["yiaddr"] == "0.0.0.0"
        assert offers[0]["bootfile"] == f"http://{SERVER_IP}:{HTTP_PORT}/boot/{NODE_MAC}.ipxe"
