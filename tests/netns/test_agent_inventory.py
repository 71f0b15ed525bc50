"""The agent's inventory and change watch inside throwaway network namespaces (pyroute2 for real).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import netlab
import pytest
from netlab import namespaces, veth_pair

pytestmark = pytest.mark.netns

SERVER_MAC = "02:00:c6:12:00:01"
AGENT_MAC = "02:00:c6:12:00:02"


def inventory_in(ns) -> dict:
    done = ns.run(sys.executable, "-m", "nodeagent", "inventory", "--json", timeout=60)
    return json.loads(done.stdout)


def test_inventory_reports_the_namespace_veth_devices():
    with namespaces(2, prefix="nba") as (left, right):
        veth_pair(left, right, "198.18.7.1/24", "198.18.7.2/24", name_a="up0", name_b="peer0")
        left.ip("link", "set", "up0", "address", AGENT_MAC)
        # A second veth whose peer stays down: no carrier.
        left.ip("link", "add", "idle0", "type", "veth", "peer", "name", "idle1")
        left.ip("link", "set", "idle0", "up")
        left.ip("addr", "add", "198.18.8.1/24", "dev", "idle0")

        inventory = inventory_in(left)
        nics = {n["name"]: n for n in inventory["nics"]}
        assert set(nics) == {"up0", "idle0", "idle1"}, "loopback is not a NIC"
        up0 = nics["up0"]
        assert up0["mac"] == AGENT_MAC
        assert up0["driver"] == "veth" and up0["kind"] == "veth"
        assert up0["link"] == "up"
        inet = [a for a in up0["addresses"] if a["family"] == "inet"]
        assert inet == [{"family": "inet", "address": "198.18.7.1", "prefixlen": 24,
                         "scope": "global"}]
        assert nics["idle0"]["link"] == "down"
        assert nics["idle1"]["link"] == "down" and nics["idle1"]["addresses"] == []
        assert [a["address"] for a in nics["idle0"]["addresses"]
                if a["family"] == "inet"] == ["198.18.8.1"]
        # The host's interfaces are not visible from inside.
        assert "eth0" not in nics
        assert inventory["cpu"]["threads"] >= 1 and inventory["memory"]["total_bytes"] > 0


def test_agent_in_a_namespace_pushes_a_new_inventory_when_links_change(tmp_path: Path):
    with namespaces(2, prefix="nba") as (server_ns, agent_ns):
        veth_pair(server_ns, agent_ns, "198.18.9.1/24", "198.18.9.2/24")
        agent_ns.ip("link", "set", "eth0", "address", AGENT_MAC)
        state = tmp_path / "state"
        (tmp_path / "images").mkdir()
        (tmp_path / "server.toml").write_text("heartbeat_interval = 1.0\n")
        logs = open(tmp_path / "logs.txt", "ab")  # noqa: SIM115
        server = server_ns.popen(
            sys.executable, "-m", "configserver", "serve", "--config",
            str(tmp_path / "server.toml"), "--state-dir", str(state), "--images",
            str(tmp_path / "images"), "--http-port", "8080", "--listen", "198.18.9.1",
            "--tftp", "off", stdout=logs, stderr=logs)
        agent = None
        try:
            netlab.wait_for((state / "server.json").exists, 30, "the server to start",
                            step=0.1, process=server, log=tmp_path / "logs.txt")
            server_ns.run(sys.executable, "-m", "configserver", "--state-dir", str(state),
                          "node", "add", AGENT_MAC, "--role", "storage")
            # As a boot script would: the CA that the agent pins.
            fingerprint = json.loads((state / "server.json").read_text())["ca_fingerprint"]
            cmdline = tmp_path / "cmdline"
            cmdline.write_text(f"netboot.ca={fingerprint}\n")
            agent = agent_ns.popen(
                sys.executable, "-m", "nodeagent", "run", "--cmdline", str(cmdline),
                "--config", "/dev/null", "--server", "http://198.18.9.1:8080",
                "--boot-id", "netns-boot", "--state-dir", str(tmp_path / "agent"),
                "--api-port", "0", stdout=logs, stderr=logs)

            def nic_names() -> set[str]:
                done = server_ns.run(sys.executable, "-m", "configserver", "--state-dir",
                                     str(state), "--json", "node", "show", AGENT_MAC)
                inventory = json.loads(done.stdout).get("inventory") or {}
                return {n["name"] for n in inventory.get("nics", [])}

            def wait(predicate, what: str) -> None:
                netlab.wait_for(predicate, 60, what, step=0.5, process=agent,
                                log=tmp_path / "logs.txt")

            # The agent found its own MAC by itself (no --mac) and pushed its inventory.
            wait(lambda: nic_names() == {"eth0"}, "the first inventory")
            agent_ns.ip("link", "add", "new0", "type", "veth", "peer", "name", "new1")
            wait(lambda: "new0" in nic_names(), "an inventory with the new link")
        finally:
            for process in (agent, server):
                if process is not None:
                    netlab.stop(process, 20)
            logs.close()
