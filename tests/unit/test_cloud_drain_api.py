"""Draining nodes over HTTP: the admin-only routes, the node JSON, and the long poll waking."""

from __future__ import annotations

import asyncio

from cloudtest import DOM0, SN1, SN2, attachment, dom0_report, exported, storage_report
from pkitest import TENANT
from test_cloud_api import admin, agent, app, as_, create, get_work, images, registry  # noqa: F401

from configserver.pki import Identity


async def attached(admin, registry):  # noqa: F811
    volume = await (await create(admin)).json()
    for mac in (SN1, SN2):
        registry.record_cloud_report(mac, storage_report(10 << 30, exported(volume["id"])))
    await admin.post("/api/v1/volumes/db/attach", json={"node": "dom0-1"})
    registry.record_cloud_report(DOM0, dom0_report(attachment(volume["id"], created=True)))
    return volume


async def test_drain_and_undrain_answer_the_node(admin, registry):  # noqa: F811
    volume = await attached(admin, registry)
    resp = await admin.post("/api/v1/nodes/sn1/drain")
    assert resp.status == 200, await resp.text()
    node = await resp.json()
    assert node["mac"] == SN1 and node["drained"] is True
    assert node["drain"] == {"requested": node["drained_since"], "legs_held": 1}
    assert [e["stage"] for e in node["events"]][-1] == "node.drain"
    shown = await (await admin.get(f"/api/v1/nodes/{SN1}")).json()
    assert shown["drain"] == node["drain"]
    legs = (await (await admin.get("/api/v1/volumes/db")).json())["legs"]
    assert [(g["node"], g["leaving"]) for g in legs] == [(SN1, True), (SN2, False)]
    registry.record_cloud_report(DOM0, dom0_report(attachment(
        volume["id"], "degraded", legs=((SN1, "missing"), (SN2, "active")))))
    shown = await (await admin.get(f"/api/v1/nodes/{SN1}")).json()
    assert shown["drain"]["legs_held"] == 0
    assert [e["stage"] for e in shown["events"]][-1] == "node.drained"
    assert (await (await admin.get(f"/api/v1/nodes/{SN2}")).json())["drain"] is None
    resp = await admin.post(f"/api/v1/nodes/{SN1}/undrain")
    node = await resp.json()
    assert resp.status == 200 and node["drained"] is False and node["drain"] is None
    assert node["drained_since"] is None


async def test_refusals_over_http(admin, registry):  # noqa: F811
    await attached(admin, registry)
    resp = await admin.post("/api/v1/nodes/dom0-1/drain")
    body = await resp.json()
    assert resp.status == 409 and "detach them first" in body["message"]
    resp = await admin.post("/api/v1/nodes/nosuch/drain")
    assert resp.status == 404


async def test_only_admins_drain(aiohttp_client, admin, pki, registry):  # noqa: F811
    tenant = await as_(aiohttp_client, admin, pki, TENANT)
    node = await as_(aiohttp_client, admin, pki, Identity("node", SN1, boot_id="b"))
    for client in (tenant, node):
        for action in ("drain", "undrain"):
            resp = await client.post(f"/api/v1/nodes/sn1/{action}")
            assert resp.status == 403, action
    assert registry.lookup(SN1).drained is None


async def test_a_drain_wakes_the_long_poll(aiohttp_client, admin, pki, registry):  # noqa: F811
    nobody = await as_(aiohttp_client, admin, pki, None)
    headers, who = agent(registry, SN1, "t" * 32)
    current = (await get_work(nobody, headers, who))["generation"]
    waiting = asyncio.ensure_future(get_work(nobody, headers, who, after=current, wait=20))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    assert (await admin.post("/api/v1/nodes/sn1/drain")).status == 200
    answer = await asyncio.wait_for(waiting, 5)
    assert answer["generation"] == current + 1 and answer["storage"]["drained"] is True


async def test_a_dom0_drain_takes_a_parallel_limit_and_shows_what_is_left(admin,  # noqa: F811
                                                                          registry):  # noqa: F811
    for body in ({"parallel": 0}, {"parallel": "2"}, {"limit": 2}, []):
        resp = await admin.post("/api/v1/nodes/dom0-1/drain", json=body)
        assert resp.status == 400, (body, await resp.text())
    assert registry.lookup(DOM0).drained is None  # nothing stored by a bad request
    resp = await admin.post("/api/v1/nodes/dom0-1/drain", json={"parallel": 3})
    node = await resp.json()
    assert resp.status == 200, node
    assert node["drain"] == {"requested": node["drained_since"], "parallel": 3,
                             "instances_left": 0, "moving": [], "stuck": []}
    assert [e["stage"] for e in node["events"]][-2:] == ["node.drain", "node.drained"]
