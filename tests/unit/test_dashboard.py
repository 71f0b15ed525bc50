"""The dashboard's HTTP side: who sees what, login links, the session cookie, CSRF and Origin
checks, the snapshot and its live feed (the page itself runs in the browser tier)."""

# ruff: noqa: F811 (the fixtures imported from other test modules are parameters here)
from __future__ import annotations

import asyncio
import json

import pytest
from cloudtest import DOM0, GIB, cloud
from pkitest import TENANT, tls_client
from test_api import registry  # noqa: F401

from configserver.cloud.instances import Instance, InstanceNic
from configserver.config import HttpConfig, ServerConfig
from configserver.http.app import create_app
from configserver.http.appkeys import REVOCATIONS, WEB_SESSIONS
from configserver.http.dashfeed import BACKLOG, DashboardFeed, changes, snapshot
from configserver.http.websession import COOKIE, CSRF_HEADER, WebSessions
from configserver.model import NodeSpec
from configserver.pki import Identity

MIB = 1 << 20
BASE = "https://198.18.0.1:8443"
SECRET_HOST = "secret-host-7"


@pytest.fixture
async def client(serve_split, pki, tmp_path, registry):
    config = ServerConfig(state_dir=tmp_path / "state", images_dir=tmp_path / "images",
                          ipxe_dir=tmp_path / "ipxe", http=HttpConfig(port=0))
    (tmp_path / "ipxe").mkdir()
    registry.add_node(NodeSpec(mac="52:54:00:aa:bb:07", role="storage", hostname=SECRET_HOST))
    return await serve_split(create_app(config, registry, pki.authority, api_base=BASE))


async def browser(aiohttp_client, client, pki):
    """A TLS client without a client certificate: a browser."""
    return await tls_client(aiohttp_client, client.server, pki, None)


async def signed_in(client, anonymous) -> tuple[dict[str, str], str]:
    """Mint a link as the admin, open it as the browser: (cookie header, CSRF token)."""
    link = await (await client.api.post("/api/v1/dashboard/login", json={})).json()
    assert link["url"].startswith(f"{BASE}/login?token=")
    path = link["url"][len(BASE):]
    resp = await anonymous.get(path, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/"
    morsel = resp.cookies[COOKIE]
    headers = {"Cookie": f"{COOKIE}={morsel.value}"}
    page = await (await anonymous.get("/", headers=headers)).text()
    marker = 'name="csrf-token" content="'
    csrf = page.split(marker, 1)[1].split('"', 1)[0]
    assert csrf
    return headers, csrf


async def test_without_credentials_the_page_is_the_login_page_and_holds_no_data(
        client, aiohttp_client, pki):
    anonymous = await browser(aiohttp_client, client, pki)
    resp = await anonymous.get("/")
    text = await resp.text()
    assert resp.status == 200 and "configserver dashboard login" in text
    assert SECRET_HOST not in text and "dashboard.js" not in text
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    for path in ("/api/v1/dashboard", "/api/v1/dashboard/events", "/api/v1/nodes"):
        assert (await anonymous.get(path)).status == 401, path
    # The static files are public: they hold no data.
    assert (await anonymous.get("/dashboard/dashboard.js")).status == 200
    assert (await anonymous.get("/dashboard/nope.js")).status == 404
    # Plain HTTP sends the browser to HTTPS; a tenant sees no dashboard.
    plain = await client.plain.get("/", allow_redirects=False)
    assert plain.status == 302 and plain.headers["Location"] == f"{BASE}/"
    tenant = await tls_client(aiohttp_client, client.server, pki, TENANT)
    resp = await tenant.get("/")
    assert resp.status == 403 and SECRET_HOST not in await resp.text()
    assert (await tenant.post("/api/v1/dashboard/login", json={})).status == 403
    assert (await anonymous.post("/api/v1/dashboard/login", json={})).status == 401


async def test_a_login_link_opens_one_session_once_with_a_strict_cookie(
        client, aiohttp_client, pki):
    anonymous = await browser(aiohttp_client, client, pki)
    link = await (await client.api.post("/api/v1/dashboard/login", json={})).json()
    assert link["for"] == "test-admin"
    path = link["url"][len(BASE):]
    resp = await anonymous.get(path, allow_redirects=False)
    assert resp.status == 303
    cookie = resp.headers["Set-Cookie"]
    for flag in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"):
        assert flag in cookie, cookie
    again = await anonymous.get(path, allow_redirects=False)
    assert again.status == 401 and "used, expired or unknown" in await again.text()
    assert (await anonymous.get("/login?token=forged", allow_redirects=False)).status == 401
    headers = {"Cookie": f"{COOKIE}={resp.cookies[COOKIE].value}"}
    page = await anonymous.get("/", headers=headers)
    text = await page.text()
    assert page.status == 200 and "dashboard.js" in text and "test-admin" in text
    # A session cannot mint links of its own (it would outlive its certificate's checks).
    _, csrf = await signed_in(client, anonymous)
    resp = await anonymous.post("/api/v1/dashboard/login", json={},
                                headers={**headers, CSRF_HEADER: csrf})
    assert resp.status == 403


async def test_a_session_needs_its_csrf_token_and_its_own_origin_to_change_anything(
        client, aiohttp_client, pki):
    anonymous = await browser(aiohttp_client, client, pki)
    headers, csrf = await signed_in(client, anonymous)
    nodes = await anonymous.get("/api/v1/nodes", headers=headers)
    assert nodes.status == 200
    assert SECRET_HOST in json.dumps(await nodes.json())
    body = {"mac": "52:54:00:aa:bb:08", "role": "dom0"}
    resp = await anonymous.post("/api/v1/nodes", json=body, headers=headers)
    assert resp.status == 403 and CSRF_HEADER in (await resp.json())["message"]
    resp = await anonymous.post("/api/v1/nodes", json=body,
                                headers={**headers, CSRF_HEADER: "wrong"})
    assert resp.status == 403
    resp = await anonymous.post("/api/v1/nodes", json=body,
                                headers={**headers, CSRF_HEADER: csrf,
                                         "Origin": "https://evil.example"})
    assert resp.status == 403 and "another site" in (await resp.json())["message"]
    host = client.api.make_url("/").host, client.api.make_url("/").port
    resp = await anonymous.post("/api/v1/nodes", json=body,
                                headers={**headers, CSRF_HEADER: csrf,
                                         "Origin": f"https://{host[0]}:{host[1]}"})
    assert resp.status == 201, await resp.text()
    # Signing out ends the session.
    assert (await anonymous.post("/logout", headers=headers)).status == 403
    assert (await anonymous.post("/logout", headers={**headers, CSRF_HEADER: csrf})
            ).status == 204
    assert (await anonymous.get("/api/v1/nodes", headers=headers)).status == 401


async def test_revoking_the_minting_certificate_ends_its_sessions(client, aiohttp_client, pki):
    anonymous = await browser(aiohttp_client, client, pki)
    headers, _ = await signed_in(client, anonymous)
    app = client.server.app
    serials = [s.serial for s in app[WEB_SESSIONS]._sessions.values()]
    assert serials and all(isinstance(s, int) for s in serials)
    app[REVOCATIONS].replace([(serials[0], 0.0)])
    assert (await anonymous.get("/api/v1/nodes", headers=headers)).status == 401
    assert len(app[WEB_SESSIONS]) == 0


def test_links_and_sessions_expire_and_are_bounded():
    now = [1000.0]
    sessions = WebSessions(lambda: now[0], link_lifetime=10, session_lifetime=100)
    admin = Identity("admin", "ann")
    with pytest.raises(ValueError):
        sessions.mint_link(TENANT, None)
    token, expires = sessions.mint_link(admin, 7)
    assert expires == 1010.0
    now[0] = 1011.0
    assert sessions.redeem(token) is None
    token, _ = sessions.mint_link(admin, 7)
    session_id, session = sessions.redeem(token)
    assert session.identity == admin and sessions.session(session_id) == session
    assert sessions.redeem(token) is None
    now[0] = 1111.0
    assert sessions.session(session_id) is None
    tokens = [sessions.mint_link(admin, None)[0] for _ in range(100)]
    assert sessions.redeem(tokens[0]) is None and sessions.redeem(tokens[-1]) is not None


def test_the_snapshot_shows_nodes_the_guest_map_and_volumes(registry):
    cloud(registry)
    registry.record_cloud_report(DOM0, {"dom0": {
        "initiator": "iqn.x", "attachments": [], "detached": [], "guests": [],
        "xen": {"total_memory_mib": 4096, "free_memory_mib": 3000}}})
    registry.create_volume("v1", GIB, None, None)
    volume, _ = registry.create_volume("web-disk", GIB, None, None)
    registry.create_instance(Instance(id="id-web", name="web", memory=256 * MIB, vcpus=1,
                                      volume=volume.id, tenant="acme", nics=(
                                          InstanceNic("52:54:00:ee:00:01", "198.18.1.7"),)))
    registry.start_instance("web", DOM0)
    shown = snapshot(registry, now=5.0)
    assert shown["time"] == 5.0 and "dom0" in shown["roles"]
    assert {n["hostname"] for n in shown["nodes"]} >= {"sn1", "sn2", "dom0-1"}
    assert "facts" not in shown["nodes"][0]
    (dom0,) = shown["dom0s"]
    assert dom0["hostname"] == "dom0-1" and dom0["instances"] == ["web"]
    assert dom0["guest_memory"] == 256 * MIB
    assert (dom0["total_memory"], dom0["free_memory"]) == (4096 * MIB, 3000 * MIB)
    (web,) = shown["instances"]
    assert web == {"name": "web", "tenant": "acme", "desired": "running", "actual": "stopped",
                   "node": DOM0, "hostname": "dom0-1", "memory": 256 * MIB, "vcpus": 1,
                   "disk": "web-disk", "ip": "198.18.1.7"}
    assert [v["name"] for v in shown["volumes"]] == ["v1", "web-disk"]
    assert {leg["hostname"] for leg in shown["volumes"][0]["legs"]} == {"sn1", "sn2"}


def picture(*names: str, time: int = 0) -> dict:
    return {"time": time, "roles": ["dom0"], "dom0s": [], "volumes": [], "instances": [],
            "nodes": [{"mac": n.split("=")[0], "state": n.split("=")[1]} for n in names]}


def test_changes_name_what_was_set_and_dropped_and_nothing_for_time_alone():
    old = picture("a=ready", "b=ready", time=1)
    assert changes(old, picture("a=ready", "b=ready", time=2)) is None
    patch = changes(old, picture("a=lost", "c=pending", time=3))
    assert patch == {"nodes": {"set": [{"mac": "a", "state": "lost"},
                                       {"mac": "c", "state": "pending"}], "drop": ["b"]},
                     "time": 3}


def apply(seen: dict, patch: dict) -> dict:
    """What the page does with a patch (dashboard.js takePatch), for the nodes."""
    nodes = {n["mac"]: n for n in seen["nodes"]}
    for name in patch.get("nodes", {}).get("drop", []):
        del nodes[name]
    for item in patch.get("nodes", {}).get("set", []):
        nodes[item["mac"]] = item
    return {**seen, "nodes": sorted(nodes.values(), key=lambda n: n["mac"])}


async def test_the_feed_builds_once_for_all_listeners_then_sends_only_changes():
    versions = iter([picture("a=ready"), picture("a=ready", time=5),
                     picture("a=lost", "b=pending"), picture("b=pending")])
    builds = []

    def build() -> dict:
        builds.append(1)
        return next(versions, picture("b=pending"))

    feed = DashboardFeed(build, interval=0.01, max_listeners=2)
    one, two = feed.stream(keepalive=5), feed.stream(keepalive=5)
    event, text = await anext(one)
    assert event == "snapshot"
    seen = json.loads(text)
    assert seen["nodes"] == [{"mac": "a", "state": "ready"}]
    event, text = await anext(two)
    assert event == "snapshot"
    for _ in range(2):  # the time alone moved once: never sent
        event, text = await anext(one)
        assert event == "patch"
        seen = apply(seen, json.loads(text))
    assert seen["nodes"] == [{"mac": "b", "state": "pending"}]
    three = feed.stream()
    with pytest.raises(Exception, match="open already"):
        await anext(three)
    await one.aclose()
    await two.aclose()
    await asyncio.sleep(0.05)
    assert feed.listeners == 0 and feed._task.done()
    count = len(builds)
    await asyncio.sleep(0.05)
    assert len(builds) == count  # nobody listens: nothing is built
    await feed.close()


async def test_a_listener_that_falls_behind_gets_a_whole_snapshot():
    state = {"n": 0}

    def build() -> dict:
        state["n"] += 1
        return picture(f"a={state['n']}")

    feed = DashboardFeed(build, interval=0.001)
    stream = feed.stream(keepalive=5)
    assert (await anext(stream))[0] == "snapshot"
    await asyncio.sleep(0.2)  # many changes, none read
    assert state["n"] > BACKLOG + 2
    event, _ = await anext(stream)
    if event == "patch":  # the backlog kept before it overflowed: then the snapshot
        for _ in range(BACKLOG + 1):
            event, _ = await anext(stream)
            if event == "snapshot":
                break
    assert event == "snapshot"
    await stream.aclose()
    await feed.close()


async def test_the_event_stream_pushes_the_snapshot(client, aiohttp_client, pki, registry):
    anonymous = await browser(aiohttp_client, client, pki)
    headers, _ = await signed_in(client, anonymous)
    resp = await anonymous.get("/api/v1/dashboard/events", headers=headers)
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    assert await resp.content.readline() == b"event: snapshot\n"
    line = await resp.content.readline()
    assert line.startswith(b"data: ")
    assert SECRET_HOST in {n["hostname"] for n in json.loads(line[6:])["nodes"]}
    registry.add_node(NodeSpec(mac="52:54:00:aa:bb:09", role="dom0", hostname="late-comer"))
    async with asyncio.timeout(10):
        while True:
            line = await resp.content.readline()
            if line == b"event: patch\n":
                patch = json.loads((await resp.content.readline())[6:])
                assert [n["hostname"] for n in patch["nodes"]["set"]] == ["late-comer"]
                break
    resp.close()


async def test_closing_the_feed_ends_every_stream_at_once():
    feed = DashboardFeed(lambda: picture("a=ready"), interval=0.01)
    stream = feed.stream(keepalive=60)
    assert (await anext(stream))[0] == "snapshot"
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)
    await feed.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 1)
    with pytest.raises(StopAsyncIteration):  # and no new one starts
        await anext(feed.stream())
