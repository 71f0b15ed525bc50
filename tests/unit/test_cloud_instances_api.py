"""Instances over HTTP: create (with its disk and address), start, stop, reboot, destroy, for
admins and tenants, and bad input refused with nothing stored."""

from __future__ import annotations

import hashlib
import json

import pytest
from cloudtest import (
    DOM0,
    DOM0B,
    GIB,
    SN1,
    SN2,
    attachment,
    cloud,
    dom0_report,
    exported,
    storage_report,
)
from pkitest import ADMIN, TENANT, tls_client

from configserver.cloud.instances import Claim
from configserver.config import CloudConfig, HttpConfig, ServerConfig
from configserver.http.agentapi import hash_token
from configserver.http.app import create_app
from configserver.pki import Identity
from configserver.registry.sqlite import SqliteRegistry

OTHER_TENANT = Identity("tenant", "olga", tenant="globex")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl t@h"


@pytest.fixture
def registry(tmp_path):
    reg = SqliteRegistry(tmp_path / "state" / "registry.sqlite")
    cloud(reg, dom0s=2)
    for mac, free in ((DOM0, 300), (DOM0B, 1200)):
        report = dom0_report()
        report["dom0"]["xen"] = {"free_memory_mib": free}
        reg.record_cloud_report(mac, report)
    yield reg
    reg.close()


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    for name, files in (("guest", ("vmlinuz", "initramfs.img", "rootfs.img")),
                        ("bare", ("vmlinuz", "initramfs.img"))):
        (root / name).mkdir(parents=True)
        for file in files:
            (root / name / file).write_bytes(b"x" * 4096)
    with open(root / "guest" / "rootfs.img", "wb") as handle:
        handle.truncate(3 << 20)
    digest = hashlib.sha256(b"x" * 4096).hexdigest()
    (root / "guest" / "manifest.json").write_text(json.dumps({
        "kernel": "vmlinuz", "initramfs": "initramfs.img", "rootfs": "rootfs.img",
        "kernel_args": "root=/dev/xvda ro console=hvc0",
        "files": {"vmlinuz": {"sha256": digest}, "initramfs.img": {"sha256": digest}}}))
    return root


@pytest.fixture
async def admin(aiohttp_client, tmp_path, registry, images, pki):
    config = ServerConfig(state_dir=tmp_path / "state", images_dir=images,
                          http=HttpConfig(port=8080, public_url="http://198.18.0.1:8080"),
                          cloud=CloudConfig(instance_pool=("198.18.0.100", "198.18.0.102")))
    app = create_app(config, registry, pki.authority, secret_key=b"s" * 32)
    return await tls_client(aiohttp_client, app, pki, ADMIN)


async def as_(aiohttp_client, admin, pki, identity):
    return await tls_client(aiohttp_client, admin.server, pki, identity)


async def create(client, **body):
    body.setdefault("name", "web")
    body.setdefault("image", "guest")
    return await client.post("/api/v1/instances", json=body)


async def test_create_makes_its_disk_and_takes_an_address(admin, registry):
    resp = await create(admin, memory="256M", vcpus=2, ssh_keys=[KEY])
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["desired"] == "stopped" and body["node"] is None and body["vcpus"] == 2
    assert body["memory"] == 256 << 20 and body["disk"] == "web-disk" and body["ssh_keys"] == 1
    [nic] = body["nics"]
    assert nic["ip"] == "198.18.0.100" and nic["mac"].startswith("00:16:3e:")
    assert registry.volume("web-disk").size == 2 * GIB
    second = await (await create(admin, name="db", ip="198.18.0.102")).json()
    assert second["nics"][0]["ip"] == "198.18.0.102"
    listed = await (await admin.get("/api/v1/instances")).json()
    assert [i["name"] for i in listed["instances"]] == ["db", "web"]
    shown = await (await admin.get("/api/v1/instances/web")).json()
    assert [e["stage"] for e in shown["timeline"]] == ["created"]


@pytest.mark.parametrize(("body", "code"), [
    ({"name": "Bad_Name"}, "invalid_name"),
    ({"memory": "16M"}, "invalid_size"),
    ({"vcpus": 0}, "invalid_request"),
    ({"vcpus": True}, "invalid_request"),
    ({"image": None}, "invalid_request"),
    ({"image": "nope"}, "unknown_image"),
    ({"image": "bare"}, "unknown_image"),  # no root file system for its disk
    ({"disk": "2M"}, "invalid_size"),  # smaller than the image's root file system
    ({"ip": "198.18.0.200"}, "invalid_request"),  # outside the instance pool
    ({"ip": "not-an-ip"}, "invalid_request"),
    ({"ssh_keys": ["-----BEGIN OPENSSH PRIVATE KEY-----"]}, "invalid_request"),
    ({"ssh_keys": "ssh-ed25519 AAAA"}, "invalid_request"),
    ({"colour": "red"}, "invalid_request"),
])
async def test_bad_creates_are_refused_and_store_nothing(admin, registry, body, code):
    resp = await create(admin, **body)
    assert resp.status in (400, 422), await resp.text()
    assert (await resp.json())["code"] == code
    assert registry.instances() == [] and registry.volumes() == []


async def test_the_pool_runs_out_with_a_clear_error_and_nothing_half_made(admin, registry):
    for name in ("a", "b", "c"):
        assert (await create(admin, name=name)).status == 201
    resp = await create(admin, name="d")
    assert resp.status == 400 and "is full" in (await resp.json())["message"]
    assert registry.instance("d") is None and registry.volume("d-disk") is None
    taken = await create(admin, name="e", ip="198.18.0.101")
    assert "taken" in (await taken.json())["message"]


async def test_start_stop_reboot_destroy(admin, registry):
    await create(admin)
    resp = await admin.post("/api/v1/instances/web/start", json={"node": "dom0-1"})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["desired"] == "running" and body["hostname"] == "dom0-1" and body["epoch"] == 1
    assert registry.volume("web-disk").attachment(DOM0) is not None
    busy = await admin.post("/api/v1/instances/web/start", json={"node": "dom0-2"})
    assert busy.status == 409 and (await busy.json())["code"] == "claim_held"
    reboot = await admin.post("/api/v1/instances/web/reboot")
    assert reboot.status == 202 and (await reboot.json())["reboots"] == 1
    stop = await admin.post("/api/v1/instances/web/stop")
    assert stop.status == 202 and (await stop.json())["desired"] == "stopped"
    assert (await admin.post("/api/v1/instances/web/reboot")).status == 409  # not running
    gone = await admin.delete("/api/v1/instances/web?delete_disk=true")
    assert gone.status == 202 and (await gone.json())["gone"] is False  # dom0-1 still holds it
    assert registry.instance("web").desired == "destroyed"
    assert (await admin.post("/api/v1/instances/web/start")).status == 409


async def test_a_start_without_a_node_goes_where_the_scheduler_puts_it(admin, registry):
    await create(admin)
    body = await (await admin.post("/api/v1/instances/web/start")).json()
    assert body["hostname"] == "dom0-2"  # the one with room for 256 MiB
    assert registry.instance("web").claim == Claim(DOM0B, 1)


async def test_an_instance_never_placed_is_forgotten_at_once(admin, registry):
    await create(admin)
    resp = await admin.delete("/api/v1/instances/web?delete_disk=true")
    assert resp.status == 200 and (await resp.json())["gone"] is True
    assert registry.instance("web") is None
    assert (await admin.get("/api/v1/instances/web")).status == 404
    assert (await admin.delete("/api/v1/instances/x?delete_disk=maybe")).status == 404
    await create(admin, name="y")
    assert (await admin.delete("/api/v1/instances/y?delete_disk=maybe")).status == 400


async def test_tenants_see_and_act_only_on_their_own(aiohttp_client, admin, pki, registry):
    tenant = await as_(aiohttp_client, admin, pki, TENANT)
    other = await as_(aiohttp_client, admin, pki, OTHER_TENANT)
    node = await as_(aiohttp_client, admin, pki, Identity("node", DOM0, boot_id="b"))
    resp = await create(tenant, name="mine")
    assert resp.status == 201 and (await resp.json())["tenant"] == "acme"
    assert registry.volume("mine-disk").tenant == "acme"
    assert (await create(admin, name="admins")).status == 201
    assert [i["name"] for i in (await (await tenant.get("/api/v1/instances")).json())[
        "instances"]] == ["mine"]
    for method, path in (("GET", "/api/v1/instances/mine"),
                         ("DELETE", "/api/v1/instances/mine"),
                         ("POST", "/api/v1/instances/mine/start"),
                         ("POST", "/api/v1/instances/mine/stop"),
                         ("POST", "/api/v1/instances/mine/reboot")):
        assert (await other.request(method, path)).status == 404, path
    placed = await tenant.post("/api/v1/instances/mine/start", json={"node": "dom0-1"})
    assert placed.status == 403  # a tenant does not pick the dom0
    assert (await tenant.post("/api/v1/instances/mine/start")).status == 200
    assert (await node.get("/api/v1/instances")).status == 403
    assert len((await (await admin.get("/api/v1/instances")).json())["instances"]) == 2


async def test_without_a_pool_only_an_admin_names_an_address(aiohttp_client, tmp_path,
                                                              registry, images, pki):
    config = ServerConfig(state_dir=tmp_path / "state", images_dir=images,
                          http=HttpConfig(port=8080, public_url="http://198.18.0.1:8080"))
    app = create_app(config, registry, pki.authority, secret_key=b"s" * 32)
    admin = await tls_client(aiohttp_client, app, pki, ADMIN)
    tenant = await as_(aiohttp_client, admin, pki, TENANT)
    resp = await create(tenant, name="mine", ip="198.18.0.1")  # the server's own address
    assert resp.status == 403 and "admin" in (await resp.json())["message"]
    assert registry.instances() == [] and registry.volumes() == []
    resp = await create(admin, name="pinned", ip="198.18.0.150")
    assert resp.status == 201 and (await resp.json())["nics"][0]["ip"] == "198.18.0.150"


async def test_the_holder_s_work_carries_the_guest_and_the_guest_its_keys(
        aiohttp_client, admin, pki, registry):
    made = await (await create(admin, ssh_keys=[KEY])).json()
    disk = registry.volume("web-disk")
    for mac in (SN1, SN2):
        registry.record_cloud_report(mac, storage_report(GIB, exported(disk.id)))
    await admin.post("/api/v1/instances/web/start", json={"node": "dom0-1"})
    registry.start_agent_session(DOM0, "boot-a", hash_token("a" * 32))
    registry.record_heartbeat(DOM0, {})
    nobody = await as_(aiohttp_client, admin, pki, None)
    who = {"mac": DOM0, "boot_id": "boot-a"}
    headers = {"Authorization": "Bearer " + "a" * 32}

    async def guests():
        resp = await nobody.get("/api/v1/agent/work", params=who, headers=headers)
        return (await resp.json())["dom0"]["guests"]

    [entry] = await guests()
    assert entry["desired"] == "running" and not entry["startable"]  # not assembled yet
    resp = await nobody.get("/api/v1/agent/work", params=who, headers=headers)
    network = (await resp.json())["dom0"]["guest_network"]
    assert "198.18.0.1" in network["servers"] and network["http_port"] == 8080
    assert network["protected"]  # the nodes' reserved addresses
    registry.record_cloud_report(DOM0, dom0_report(attachment(disk.id, created=True)))
    [entry] = await guests()
    digest = hashlib.sha256(b"x" * 4096).hexdigest()
    assert entry["desired"] == "running" and entry["startable"] and entry["epoch"] == 1
    assert entry["kernel"] == {"url": "http://198.18.0.1:8080/images/guest/vmlinuz",
                               "sha256": digest}
    assert entry["cmdline"].startswith("root=/dev/xvda ro console=hvc0 netboot.server=")
    mac = made["nics"][0]["mac"]
    keys = await nobody.get("/boot/ssh-keys", params={"mac": mac})
    assert keys.status == 200 and await keys.text() == KEY + "\n"
    other = await nobody.get("/api/v1/agent/work",
                             params={"mac": DOM0B, "boot_id": "x"}, headers=headers)
    assert other.status in (401, 403)


async def test_usage_over_http_for_its_tenant_only(aiohttp_client, admin, pki, registry):
    tenant = await as_(aiohttp_client, admin, pki, TENANT)
    other = await as_(aiohttp_client, admin, pki, OTHER_TENANT)
    assert (await create(tenant, name="mine")).status == 201
    resp = await tenant.get("/api/v1/instances/mine/usage",
                            params={"since": "2026-01-01T00:00:00Z"})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["instance"] == "mine" and body["usage"]["cpu_seconds"] == 0
    assert set(body["usage"]) == {"cpu_seconds", "net_rx_bytes", "net_tx_bytes",
                                  "disk_read_bytes", "disk_write_bytes"}
    assert (await other.get("/api/v1/instances/mine/usage")).status == 404
    bad = await tenant.get("/api/v1/instances/mine/usage", params={"since": "yesterday"})
    assert bad.status == 400 and "ISO 8601" in (await bad.json())["hint"]


def test_since_reads_unix_seconds_and_iso_8601():
    from configserver.http.instancesapi import parse_since

    assert parse_since(None) is None and parse_since("1700000000.5") == 1700000000.5
    assert parse_since("2026-12-01T00:00:00Z") == parse_since("2026-12-01T00:00:00") == (
        parse_since("2026-12-01T01:00:00+01:00"))


async def test_resource_controls_at_create_and_changed_while_running(aiohttp_client, admin,
                                                                     pki, registry):
    tenant = await as_(aiohttp_client, admin, pki, TENANT)
    refused = await create(tenant, name="mine", cpu_weight=65535)  # all of a dom0: no
    assert refused.status == 403 and registry.instance("mine") is None
    assert (await create(tenant, name="mine")).status == 201
    resp = await admin.patch("/api/v1/instances/mine", json={
        "cpu_weight": 512, "net_rate": "10Mbit", "max_memory": "512M"})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["resources"] == {"cpu_weight": 512, "cpu_cap": 0, "net_rate": 1_250_000,
                                 "max_memory": 512 << 20}
    bad = await create(admin, name="other", cpu_cap=500)  # above 100 % of its one vCPU
    assert bad.status == 400 and registry.instance("other") is None
    assert (await tenant.post("/api/v1/instances/mine/start")).status == 200
    assert (await tenant.patch("/api/v1/instances/mine", json={"cpu_cap": 50})).status == 403
    resp = await tenant.patch("/api/v1/instances/mine", json={"memory": "384M"})
    assert resp.status == 200, await resp.text()
    resp = await admin.patch("/api/v1/instances/mine", json={"cpu_cap": 50})
    body = await resp.json()
    assert body["memory"] == 384 << 20 and body["resources"]["cpu_cap"] == 50
    for change, says in (({"memory": "1G"}, "above max_memory"),
                         ({"max_memory": "1G"}, "while the instance is stopped"),
                         ({}, "nothing to change"), ({"vcpus": 2}, "unknown field")):
        resp = await admin.patch("/api/v1/instances/mine", json=change)
        assert resp.status == 400 and says in (await resp.json())["message"], change
    assert registry.instance("mine").memory == 384 << 20  # the refusals changed nothing
    shown = await (await admin.get("/api/v1/instances/mine")).json()
    assert "resources.changed" in [e["stage"] for e in shown["timeline"]]
    # ...and the dom0's work carries them for the agent.
    [entry] = guest_entries(registry, registry.instance("mine").claim.node)
    assert (entry["cpu_cap"], entry["cpu_weight"], entry["max_memory_mib"]) == (50, 512, 512)
    assert entry["memory_mib"] == 384 and entry["net_rate"] == 1_250_000


def guest_entries(registry, mac):
    from configserver.cloud.guestwork import guest_work

    return guest_work(registry.instances(), mac, volumes={v.id: v for v in registry.volumes()},
                      boots={}, server_url="http://198.18.0.1:8080")
