"""Volumes over HTTP (admins and tenants) and the agents' work and report endpoints."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from cloudtest import DOM0, GIB, SN1, SN2, attachment, cloud, dom0_report, exported, storage_report
from pkitest import ADMIN, TENANT, tls_client

from configserver.cloud.model import chap_secret
from configserver.config import HttpConfig, ServerConfig
from configserver.http.agentapi import hash_token
from configserver.http.app import create_app
from configserver.http.appkeys import SECRET_KEY
from configserver.pki import Identity
from configserver.registry.sqlite import SqliteRegistry

OTHER_TENANT = Identity("tenant", "olga", tenant="globex")


@pytest.fixture
def registry(tmp_path):
    reg = SqliteRegistry(tmp_path / "state" / "registry.sqlite")
    cloud(reg)
    yield reg
    reg.close()


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    guest = root / "guest"
    guest.mkdir(parents=True)
    for name in ("vmlinuz", "initramfs.img"):
        (guest / name).write_bytes(b"x")
    (guest / "rootfs.img").write_bytes(b"R" * 4096)
    big = root / "big"
    big.mkdir()
    for name in ("vmlinuz", "initramfs.img"):
        (big / name).write_bytes(b"x")
    with open(big / "rootfs.img", "wb") as handle:
        handle.truncate(3 << 20)
    bare = root / "bare"
    bare.mkdir()
    for name in ("vmlinuz", "initramfs.img"):
        (bare / name).write_bytes(b"x")
    return root


@pytest.fixture
async def app(tmp_path, registry, images, pki):
    config = ServerConfig(state_dir=tmp_path / "state", images_dir=images,
                          http=HttpConfig(port=8080, public_url="http://198.18.0.1:8080"))
    return create_app(config, registry, pki.authority, secret_key=b"s" * 32)


@pytest.fixture
async def admin(aiohttp_client, app, pki):
    return await tls_client(aiohttp_client, app, pki, ADMIN)


async def as_(aiohttp_client, admin, pki, identity):
    return await tls_client(aiohttp_client, admin.server, pki, identity)


async def create(client, **body):
    body.setdefault("name", "db")
    body.setdefault("size", "2G")
    return await client.post("/api/v1/volumes", json=body)


async def test_create_list_show_delete(admin, registry):
    resp = await create(admin, image="guest")
    assert resp.status == 201, await resp.text()
    volume = await resp.json()
    assert volume["size"] == 2 * GIB and volume["state"] == "creating"
    assert volume["image"] == "guest" and volume["tenant"] is None
    assert [(g["node"], g["hostname"], g["portal"], g["state"]) for g in volume["legs"]] == [
        (SN1, "sn1", "198.18.0.51:3260", "pending"), (SN2, "sn2", "198.18.0.52:3260",
                                                      "pending")]
    assert volume["legs"][0]["lv"] == f"nb-{volume['id']}"
    assert volume["attached"] == [] and volume["redundancy"] == "unknown"
    assert set(volume) >= {"id", "name", "size", "image", "tenant", "state", "redundancy",
                           "initialized", "created", "legs", "attached", "error"}
    listed = await (await admin.get("/api/v1/volumes")).json()
    assert [v["name"] for v in listed["volumes"]] == ["db"]
    shown = await (await admin.get("/api/v1/volumes/db")).json()
    assert [e["stage"] for e in shown["timeline"]] == ["created", "placed"]
    resp = await admin.delete("/api/v1/volumes/db")
    assert resp.status == 202 and (await resp.json())["state"] == "deleting"


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"size": "0"}, 400, "invalid_size"), ({"size": "lots"}, 400, "invalid_size"),
    ({"name": "Bad_Name"}, 400, "invalid_name"), ({"size": "100G"}, 409, "no_room"),
    ({"image": "nosuch"}, 422, "unknown_image"), ({"image": "bare"}, 422, "unknown_image"),
    ({"colour": "red"}, 400, "invalid_request"),
    ({"image": "big", "size": "2M"}, 400, "invalid_size"),
])
async def test_bad_creates_are_refused_and_store_nothing(admin, registry, body, status, code):
    generation = registry.cloud_generation()
    resp = await create(admin, **body)
    assert resp.status == status
    error = await resp.json()
    assert error["code"] == code, error
    assert registry.volumes() == [] and registry.cloud_generation() == generation
    if body.get("image") == "nosuch":
        assert "guest" in error["hint"] and "bare" not in error["hint"]


async def test_duplicate_names_and_unknown_volumes(admin):
    assert (await create(admin)).status == 201
    resp = await create(admin)
    assert resp.status == 409 and (await resp.json())["code"] == "duplicate_volume"
    for method, path in (("GET", "/api/v1/volumes/nosuch"), ("DELETE", "/api/v1/volumes/x"),
                         ("POST", "/api/v1/volumes/x/attach")):
        resp = await admin.request(method, path, json={"node": "dom0-1"})
        assert resp.status == 404, path


async def test_attach_then_delete_is_refused_saying_where(admin):
    await create(admin)
    resp = await admin.post("/api/v1/volumes/db/attach", json={"node": "dom0-1"})
    assert resp.status == 200
    assert [(a["node"], a["hostname"], a["state"]) for a in (await resp.json())["attached"]
            ] == [(DOM0, "dom0-1", "requested")]
    resp = await admin.delete("/api/v1/volumes/db")
    assert resp.status == 409 and "dom0-1" in (await resp.json())["message"]
    resp = await admin.post("/api/v1/volumes/db/attach", json={"node": "sn1"})
    assert resp.status == 422 and (await resp.json())["code"] == "not_a_dom0"
    resp = await admin.post("/api/v1/volumes/db/detach", json={"node": DOM0})
    assert (await resp.json())["attached"][0]["state"] == "detaching"


async def test_tenants_see_and_act_only_on_their_own(aiohttp_client, admin, pki, registry):
    tenant = await as_(aiohttp_client, admin, pki, TENANT)
    other = await as_(aiohttp_client, admin, pki, OTHER_TENANT)
    node = await as_(aiohttp_client, admin, pki, Identity("node", SN1, boot_id="b"))
    resp = await create(tenant, name="mine")
    assert resp.status == 201 and (await resp.json())["tenant"] == "acme"
    assert (await create(admin, name="admins")).status == 201
    assert [v["name"] for v in (await (await tenant.get("/api/v1/volumes")).json())["volumes"]
            ] == ["mine"]
    assert (await (await other.get("/api/v1/volumes")).json())["volumes"] == []
    for method, path in (("GET", "/api/v1/volumes/mine"), ("DELETE", "/api/v1/volumes/mine"),
                         ("POST", "/api/v1/volumes/mine/attach")):
        resp = await other.request(method, path, json={"node": "dom0-1"})
        assert resp.status == 404, path
    assert (await tenant.get("/api/v1/volumes/admins")).status == 404
    assert (await node.get("/api/v1/volumes")).status == 403
    assert len((await (await admin.get("/api/v1/volumes")).json())["volumes"]) == 2
    assert registry.volume("mine").state == "creating"


# -- the agents' side -----------------------------------------------------------------------

def agent(registry, mac, token):
    registry.start_agent_session(mac, f"boot-{mac}", hash_token(token))
    registry.record_heartbeat(mac, {})
    return {"Authorization": f"Bearer {token}"}, {"mac": mac, "boot_id": f"boot-{mac}"}


async def get_work(client, headers, who, **query):
    resp = await client.get("/api/v1/agent/work", headers=headers,
                            params={**who, **{k: str(v) for k, v in query.items()}})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def report(client, headers, who, body):
    return await client.post("/api/v1/agent/report", headers=headers,
                             json={**who, "generation": 0, **body})


async def test_work_for_storage_and_dom0_follows_the_reports(aiohttp_client, admin, pki,
                                                            registry):
    nobody = await as_(aiohttp_client, admin, pki, None)
    sn1, sn1_who = agent(registry, SN1, "t" * 32)
    dom0, dom0_who = agent(registry, DOM0, "d" * 32)
    volume = await (await create(admin, image="guest")).json()
    vid = volume["id"]
    await admin.post("/api/v1/volumes/db/attach", json={"node": "dom0-1"})
    work = await get_work(nobody, sn1, sn1_who)
    secret = chap_secret(b"s" * 32, vid, DOM0)
    assert work == {"generation": registry.cloud_generation(), "role": "storage", "storage": {
        "vg": "netboot", "remove": [], "drained": False, "exports": [{
            "volume": vid, "name": "db", "lv": f"nb-{vid}", "size": 2 * GIB + (4 << 20),
            "volume_size": 2 * GIB, "target": f"iqn.2026-12.net.netboot:vol-{vid}",
            "image": {"name": "guest", "url": "http://198.18.0.1:8080/images/guest/rootfs.img",
                      "size": 4096, "sha256": None},
            "initiators": [{"node": DOM0, "iqn": "iqn.2026-12.net.netboot:node-52540000d001",
                            "user": "node-52540000d001", "secret": secret}]}]}}
    # The dom0 gets nothing until both legs are exported.
    work = (await get_work(nobody, dom0, dom0_who))["dom0"]
    assert work.pop("guest_network")["protected"]  # the storage nodes' addresses
    assert work == {"initiator": "iqn.2026-12.net.netboot:node-52540000d001",
                    "attachments": [], "guests": [], "incoming": []}
    resp = await report(nobody, sn1, sn1_who, storage_report(GIB, exported(vid)))
    assert resp.status == 200 and (await resp.json())["stored"] is True
    registry.record_cloud_report(SN2, storage_report(GIB, exported(vid)))
    work = await get_work(nobody, dom0, dom0_who)
    assert work["role"] == "dom0" and "storage" not in work
    assert work["dom0"]["attachments"] == [{
        "volume": vid, "name": "db", "size": 2 * GIB, "md_name": f"nb-{vid}",
        "device": f"/dev/md/nb-{vid}", "create": True, "standby": False,
        "user": "node-52540000d001", "secret": secret, "legs": [
            {"node": SN1, "portal": "198.18.0.51:3260",
             "target": f"iqn.2026-12.net.netboot:vol-{vid}", "lun": 0, "leaving": False},
            {"node": SN2, "portal": "198.18.0.52:3260",
             "target": f"iqn.2026-12.net.netboot:vol-{vid}", "lun": 0, "leaving": False}]}]
    resp = await report(nobody, dom0, dom0_who, dom0_report(attachment(vid, created=True)))
    assert resp.status == 200
    work = await get_work(nobody, dom0, dom0_who)
    assert work["dom0"]["attachments"][0]["create"] is False
    shown = await (await admin.get("/api/v1/volumes/db")).json()
    assert shown["state"] == "ready" and shown["initialized"] and \
        shown["redundancy"] == "redundant"
    assert shown["attached"][0]["device"] == f"/dev/md/nb-{vid}"
    # A degraded, initialized volume stays attachable with one leg.
    registry.record_cloud_report(SN2, storage_report(GIB, []))
    assert len((await get_work(nobody, dom0, dom0_who))["dom0"]["attachments"]) == 1


async def test_agent_endpoints_need_the_session(aiohttp_client, admin, pki, registry):
    nobody = await as_(aiohttp_client, admin, pki, None)
    headers, who = agent(registry, SN1, "t" * 32)
    resp = await nobody.get("/api/v1/agent/work", params=who)
    assert resp.status == 401
    resp = await nobody.get("/api/v1/agent/work", headers=headers,
                            params={**who, "boot_id": "other"})
    assert resp.status == 401
    resp = await nobody.post("/api/v1/agent/report", headers=headers,
                             json={"mac": DOM0, "boot_id": who["boot_id"], "storage": {}})
    assert resp.status == 401


async def test_malformed_and_oversized_reports_are_refused(aiohttp_client, admin, pki,
                                                          registry):
    nobody = await as_(aiohttp_client, admin, pki, None)
    headers, who = agent(registry, SN1, "t" * 32)
    facts = registry.storage_facts(SN1)
    for body in ({"storage": {"exports": "no"}}, {}, {"storage": {}, "dom0": {}},
                 {"storage": {"vg": {"name": "netboot", "size": "big", "free": 1}}}):
        resp = await report(nobody, headers, who, body)
        assert resp.status == 400, body
    big = {"storage": {"orphans": ["x" * 900] * 300}}
    resp = await nobody.post("/api/v1/agent/report", headers=headers,
                             data=json.dumps({**who, **big}))
    assert resp.status == 413
    assert registry.storage_facts(SN1) == facts


async def test_the_long_poll(aiohttp_client, admin, pki, registry):
    nobody = await as_(aiohttp_client, admin, pki, None)
    headers, who = agent(registry, SN1, "t" * 32)
    current = registry.cloud_generation()
    began = time.monotonic()
    assert (await get_work(nobody, headers, who, after=current + 7, wait=5))[
        "generation"] == current
    assert (await get_work(nobody, headers, who))["generation"] == current
    assert time.monotonic() - began < 2
    began = time.monotonic()
    await get_work(nobody, headers, who, after=current, wait=0.3)
    assert 0.25 < time.monotonic() - began < 3
    # A desired change wakes a waiting poll at once.
    began = time.monotonic()
    waiting = asyncio.ensure_future(get_work(nobody, headers, who, after=current, wait=20))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await create(admin)
    answer = await asyncio.wait_for(waiting, 5)
    assert answer["generation"] == current + 1 and answer["storage"]["exports"]
    assert time.monotonic() - began < 5
    assert admin.server.app[SECRET_KEY] == b"s" * 32
