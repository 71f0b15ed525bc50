"""Volumes through the real CLI against a real `configserver serve`, and the agents' long poll
over HTTPS (storage agents played by urllib: lookup, heartbeat, report, work)."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import Server, cli

pytestmark = pytest.mark.integration

GIB = 1 << 30
STORAGE = {"52:54:00:00:05:01": ("sn1", "198.18.0.51"), "52:54:00:00:05:02": ("sn2",
                                                                         "198.18.0.52")}
DOM0 = "52:54:00:00:d0:01"


def guest_server(tmp_path: Path, *extra: str) -> Iterator[Server]:
    """A running server with a small guest image (kernel, initramfs, root file system)."""
    images = tmp_path / "images" / "guest"
    images.mkdir(parents=True)
    for name in ("vmlinuz", "initramfs.img", "rootfs.img"):
        (images / name).write_bytes(b"x" * 100)
    srv = Server(tmp_path / "state", tmp_path / "images", *extra)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def server(tmp_path):
    yield from guest_server(tmp_path)


class Agent:
    """One node's agent over HTTPS with its token."""

    def __init__(self, server: Server, mac: str) -> None:
        self.server, self.mac, self.boot_id = server, mac, f"boot-{mac.replace(':', '')}"
        self.context = ssl.create_default_context(cafile=str(server.state / "pki" / "ca.pem"))
        answer = self.call("POST", "/api/v1/agent/lookup",
                           {"macs": [mac], "boot_id": self.boot_id})
        self.token = answer["token"]
        self.call("POST", "/api/v1/agent/heartbeat", self.body(status={}))

    def body(self, **extra):
        return {"mac": self.mac, "boot_id": self.boot_id, **extra}

    def call(self, method: str, path: str, body=None, timeout: float = 30):
        request = urllib.request.Request(
            self.server.api_url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json",
                     **({"Authorization": f"Bearer {self.token}"}
                        if getattr(self, "token", None) else {})})
        with urllib.request.urlopen(request, timeout=timeout, context=self.context) as resp:
            return json.loads(resp.read())

    def work(self, **query):
        params = "&".join(f"{k}={v}" for k, v in {"mac": self.mac, "boot_id": self.boot_id,
                                                   **query}.items())
        return self.call("GET", f"/api/v1/agent/work?{params}", timeout=90)

    def report_storage(self, free: int, exports=()):
        return self.call("POST", "/api/v1/agent/report", self.body(generation=0, storage={
            "vg": {"name": "netboot", "size": 100 * GIB, "free": free}, "disks": [],
            "exports": [{"volume": v, "state": "exported", "error": None, "sessions": [],
                         "progress": None} for v in exports], "removed": [], "orphans": []}))


def ok(server, *args):
    done = cli(server, *args)
    assert done.returncode == 0, (args, done.stderr)
    return json.loads(done.stdout) if "--json" in args else done.stdout


def refused(server, *args, says: str):
    done = cli(server, *args)
    assert done.returncode == 1, args
    assert done.stderr.startswith("configserver: error:") and done.stderr.count("\n") == 1
    assert says in done.stderr and "Traceback" not in done.stderr


def test_volumes_through_the_cli_and_the_long_poll(server):
    refused(server, "volume", "create", "v", "--size", "2G", says="two ready storage nodes")
    agents = []
    for mac, (hostname, ip) in STORAGE.items():
        ok(server, "node", "add", mac, "--role", "storage", "--hostname", hostname, "--ip", ip)
        agent = Agent(server, mac)
        agent.report_storage(10 * GIB)
        agents.append(agent)
    ok(server, "node", "add", DOM0, "--role", "dom0", "--hostname", "dom0-1")
    refused(server, "volume", "create", "v", "--size", "0", says="above zero")
    refused(server, "volume", "create", "v", "--size", "lots", says="not a size")
    refused(server, "volume", "create", "v", "--size", "20G", says="does not fit")
    refused(server, "volume", "create", "v", "--size", "1G", "--image", "nosuch",
            says="guest")
    assert ok(server, "volume", "list", "--json") == []
    generation = agents[0].work()["generation"]

    volume = ok(server, "volume", "create", "v", "--size", "2G", "--image", "guest", "--json")
    assert volume["size"] == 2 * GIB and volume["state"] == "creating"
    assert {g["hostname"] for g in volume["legs"]} == {"sn1", "sn2"}
    refused(server, "volume", "create", "v", "--size", "1G", says="exists")
    assert [v["name"] for v in ok(server, "volume", "list", "--json")] == ["v"]

    # The long poll: at once on a changed generation, after ~wait on an unchanged one.
    began = time.monotonic()
    work = agents[0].work(after=generation, wait=30)
    assert time.monotonic() - began < 5
    assert work["generation"] > generation
    assert work["storage"]["exports"][0]["volume"] == volume["id"]
    assert work["storage"]["exports"][0]["image"]["size"] == 100
    began = time.monotonic()
    assert agents[0].work(after=work["generation"], wait=1)["generation"] == work["generation"]
    assert 0.9 < time.monotonic() - began < 5

    for agent in agents:
        agent.report_storage(8 * GIB, exports=[volume["id"]])
    attached = ok(server, "volume", "attach", "v", "dom0-1", "--json")
    assert [a["hostname"] for a in attached["attached"]] == ["dom0-1"]
    shown = ok(server, "volume", "show", "v", "--json")
    assert shown["state"] == "ready" and shown["redundancy"] == "redundant"
    stages = [e["stage"] for e in shown["timeline"]]
    assert stages[:2] == ["created", "placed"] and "attach.requested" in stages
    text = ok(server, "volume", "show", "v")
    assert "dom0-1" in text and "sn1" in text and "Timeline:" in text
    refused(server, "volume", "delete", "v", says="dom0-1")
    refused(server, "volume", "attach", "v", "sn1", says="not a dom0")

    # A restart keeps the volume and the generation.
    before = agents[0].work()["generation"]
    server.stop()
    server.start()
    assert [v["id"] for v in ok(server, "volume", "list", "--json")] == [volume["id"]]
    again = Agent.__new__(Agent)
    again.__dict__.update(agents[0].__dict__, server=server)
    assert again.work()["generation"] == before
    ok(server, "volume", "detach", "v", "dom0-1")
    assert ok(server, "volume", "list", "--json")[0]["attached"][0]["state"] == "detaching"
    assert again.work()["generation"] == before + 1


def test_volume_help_lists_the_actions(tmp_path):
    done = subprocess.run([sys.executable, "-m", "configserver", "volume", "--help"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0
    for action in ("create", "list", "show", "delete", "attach", "detach"):
        assert action in done.stdout


class Dom0(Agent):
    def report(self, volume_id: str, legs):
        return self.call("POST", "/api/v1/agent/report", self.body(generation=0, dom0={
            "initiator": "iqn.x", "detached": [], "attachments": [{
                "volume": volume_id, "state": "attached" if all(
                    s == "active" for _, s in legs) else "degraded",
                "device": f"/dev/md/nb-{volume_id}", "created": True, "sync": None,
                "error": None, "legs": [{"node": n, "state": s} for n, s in legs]}]}))


def test_drain_and_undrain_through_the_cli(server):
    agents = {}
    for mac, (hostname, ip) in STORAGE.items():
        ok(server, "node", "add", mac, "--role", "storage", "--hostname", hostname, "--ip", ip)
        agents[mac] = Agent(server, mac)
        agents[mac].report_storage(10 * GIB)
    ok(server, "node", "add", DOM0, "--role", "dom0", "--hostname", "dom0-1")
    volume = ok(server, "volume", "create", "v", "--size", "1G", "--json")
    for agent in agents.values():
        agent.report_storage(8 * GIB, exports=[volume["id"]])
    ok(server, "volume", "attach", "v", "dom0-1")
    dom0 = Dom0(server, DOM0)
    sn1, sn2 = STORAGE
    dom0.report(volume["id"], [(sn1, "active"), (sn2, "active")])
    # A volume attached by hand is no instance's disk: a drain cannot move it live.
    refused(server, "node", "drain", "dom0-1", says="no instance's disk there (v): detach them")
    refused(server, "node", "drain", "dom0-1", "--parallel", "0",
            says="parallel must be an integer from 1 to 16")

    assert ok(server, "node", "drain", "sn1").strip() == \
        "draining sn1: 1 leg still held by dom0s"
    node = ok(server, "node", "drain", "sn1", "--json")  # again: nothing changes
    assert node["drained"] is True and node["drain"]["legs_held"] == 1
    assert ok(server, "node", "show", sn1, "--json")["drain"] == node["drain"]
    refused(server, "volume", "create", "w", "--size", "1G", says="drained: sn1")
    legs = dom0.work()["dom0"]["attachments"][0]["legs"]
    assert [(g["node"], g["leaving"]) for g in legs] == [(sn1, True), (sn2, False)]
    assert [e["volume"] for e in agents[sn1].work()["storage"]["exports"]] == [volume["id"]]
    done = cli(server, "node", "drain", "sn1", "--wait", "1")
    assert done.returncode == 1 and "1 leg still held" in done.stderr

    # --wait finishes once the dom0 reports that it let go of the leg.
    waiting = subprocess.Popen(
        [sys.executable, "-m", "configserver", "--state-dir", str(server.state), "node",
         "drain", "sn1", "--wait", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    time.sleep(1.5)
    assert waiting.poll() is None
    dom0.report(volume["id"], [(sn1, "missing"), (sn2, "active")])
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 0, err
    assert out.strip() == "sn1 drained: safe to power off"
    storage = agents[sn1].work()["storage"]
    assert storage["drained"] is True and storage["exports"] == []
    assert ok(server, "volume", "show", "v", "--json")["redundancy"] == "degraded"

    assert "undrained" in ok(server, "node", "undrain", "sn1")
    assert ok(server, "node", "show", sn1, "--json")["drain"] is None
    assert [e["volume"] for e in agents[sn1].work()["storage"]["exports"]] == [volume["id"]]
    assert not any(g["leaving"] for g in dom0.work()["dom0"]["attachments"][0]["legs"])
