"""Instances through the real CLI against a real `configserver serve` with an instance pool;
the storage nodes and the dom0 played by urllib agents over HTTPS (their reports, the work
and the claim check the dom0 makes before `xl create`)."""

from __future__ import annotations

import json
import urllib.error

import pytest
from test_volumes_cli import DOM0, GIB, STORAGE, Agent, guest_server, ok, refused

pytestmark = pytest.mark.integration

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl t@h"


@pytest.fixture
def server(tmp_path):
    yield from guest_server(tmp_path, "--instance-pool", "198.18.0.100-198.18.0.101")


class Dom0(Agent):
    def report(self, **dom0):
        """A report following the work as it is now (as an agent's pass does)."""
        generation = self.work()["generation"]
        return self.call("POST", "/api/v1/agent/report", self.body(
            generation=generation, dom0={"initiator": "iqn.x", "detached": [],
                                         "attachments": [], **dom0}))

    def claim(self, instance: str, epoch: int) -> tuple[int, dict]:
        try:
            return 200, self.call("POST", "/api/v1/agent/claim",
                                  self.body(instance=instance, epoch=epoch))
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


def test_instances_through_the_cli(server, tmp_path):
    for mac, (hostname, ip) in STORAGE.items():
        ok(server, "node", "add", mac, "--role", "storage", "--hostname", hostname, "--ip", ip)
        Agent(server, mac).report_storage(10 * GIB)
    ok(server, "node", "add", DOM0, "--role", "dom0", "--hostname", "dom0-1")
    dom0 = Dom0(server, DOM0)
    key = tmp_path / "id.pub"
    key.write_text(KEY + "\n")

    refused(server, "instance", "create", "web", "--memory", "16M", says="at least 64 MiB")
    refused(server, "instance", "create", "web", "--ip", "10.0.0.1", says="instance pool")
    refused(server, "instance", "create", "web", "--image", "nosuch", says="no image")
    refused(server, "instance", "create", "Web", says="name")
    assert ok(server, "instance", "list", "--json") == []
    assert ok(server, "volume", "list", "--json") == []  # nothing half made

    made = ok(server, "instance", "create", "web", "--disk", "1G", "--ssh-key", str(key),
              "--json")
    assert made["desired"] == "stopped" and made["disk"] == "web-disk"
    assert made["nics"][0]["ip"] == "198.18.0.100" and made["ssh_keys"] == 1
    refused(server, "instance", "create", "web", says="exists")
    ok(server, "instance", "create", "db", "--disk", "1G")
    refused(server, "instance", "create", "third", "--disk", "1G", says="is full")

    refused(server, "instance", "start", "web", says="has not reported its memory")
    dom0.report(xen={"free_memory_mib": 1400, "hap": False})
    started = ok(server, "instance", "start", "web", "--json")
    assert started["hostname"] == "dom0-1" and started["epoch"] == 1
    assert dom0.claim("web", 1) == (200, {"held": True, "epoch": 1})
    assert dom0.claim("web", 0)[0] == 409
    text = ok(server, "instance", "list")
    assert "web" in text and "dom0-1" in text and "198.18.0.100" in text
    shown = ok(server, "instance", "show", "web")
    assert "Dom0:         dom0-1" in shown and "Timeline:" in shown

    dom0.report(xen={"free_memory_mib": 1100}, guests=[{
        "id": made["id"], "domain": "nb-web", "epoch": 1, "state": "blocked", "domid": 3,
        "cpu_seconds": 1.5, "net_rx_bytes": 4096, "disk_write_bytes": 8192}])
    assert ok(server, "instance", "show", "web", "--json")["actual"] == "running"
    used = ok(server, "instance", "usage", "web", "--json")
    assert used["usage"]["net_rx_bytes"] == 4096 and used["usage"]["disk_write_bytes"] == 8192
    text = ok(server, "instance", "usage", "web", "--since", "2026-01-01T00:00:00Z")
    assert "net_rx_bytes:     4096" in text and "cpu_seconds:      1.5" in text
    refused(server, "instance", "usage", "web", "--since", "soon", says="not a time")
    changed = ok(server, "instance", "set", "web", "--weight", "512", "--rate", "100Mbit",
                 "--json")
    assert changed["resources"]["cpu_weight"] == 512
    assert changed["resources"]["net_rate"] == 12_500_000
    refused(server, "instance", "set", "web", "--memory", "512M", says="memory ceiling")
    assert "cpu_cap 25" in ok(server, "instance", "set", "web", "--cap", "25")
    assert ok(server, "instance", "reboot", "web", "--json")["reboots"] == 1
    ok(server, "instance", "stop", "web")
    assert dom0.claim("web", 1)[0] == 409  # wanted stopped: no creating it any more
    destroying = ok(server, "instance", "destroy", "web", "--delete-disk", "--json")
    assert destroying["gone"] is False and destroying["desired"] == "destroyed"
    refused(server, "instance", "start", "web", says="being destroyed")
    dom0.report(guests=[{"id": made["id"], "domain": "nb-web", "epoch": 1,
                         "state": "stopped"}])
    assert [i["name"] for i in ok(server, "instance", "list", "--json")] == ["db"]
    assert ok(server, "volume", "show", "web-disk", "--json")["state"] == "deleting"
    assert "destroyed" in ok(server, "instance", "destroy", "db")  # never placed: at once
    assert ok(server, "instance", "list", "--json") == []
