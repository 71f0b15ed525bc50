"""Server side of the agent protocol (configserver.http.agentapi) through aiohttp's test client."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

from configserver.cloud.instances import Instance
from configserver.config import HttpConfig, ServerConfig
from configserver.http.agentapi import AGENT_API, AgentApiState, LookupRateLimiter
from configserver.http.app import create_app
from configserver.http.appkeys import SECRET_KEY
from configserver.http.tickets import issue_ticket
from configserver.model import NodeSpec, NodeState
from configserver.pki import CertificateAuthority
from configserver.registry.sqlite import SqliteRegistry

MAC = "52:54:00:aa:bb:01"
OTHER = "52:54:00:aa:bb:02"
BOOT = "3f0c1a52-0000-4000-8000-000000000001"


@pytest.fixture
def registry(tmp_path):
    reg = SqliteRegistry(tmp_path / "state" / "registry.sqlite")
    reg.add_node(NodeSpec(mac=MAC, role="storage", hostname="store1"))
    yield reg
    reg.close()


def make_app(tmp_path, registry, **config):
    config.setdefault("heartbeat_interval", 7.0)
    server = ServerConfig(state_dir=tmp_path / "state", images_dir=tmp_path / "images",
                          http=HttpConfig(port=0, plain_agent_api=True), **config)
    return create_app(server, registry, CertificateAuthority.load_or_create(tmp_path / "pki"))


@pytest.fixture
async def client(aiohttp_client, tmp_path, registry):
    return await aiohttp_client(make_app(tmp_path, registry))


async def lookup(client, macs=(MAC,), boot_id=BOOT, ticket=None):
    body = {"macs": list(macs), "boot_id": boot_id}
    if ticket is not None:
        body["ticket"] = ticket
    return await client.post("/api/v1/agent/lookup", json=body)


def ticket_now(client, mac=MAC, at=None):
    """The ticket a boot script rendered now (or ``at``) would carry. A ticket counts whole
    milliseconds, so "now" is a few milliseconds after whatever the test did just before (a
    real boot script comes seconds after the session it replaces)."""
    if at is None:
        time.sleep(0.005)
        at = time.time()
    return issue_ticket(client.server.app[SECRET_KEY], mac, at)


async def heartbeat(client, token, mac=MAC, boot_id=BOOT, status=None):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return await client.post("/api/v1/agent/heartbeat", headers=headers,
                             json={"mac": mac, "boot_id": boot_id,
                                   "status": status or {"uptime": 1.0}})


async def test_lookup_returns_identity_interval_and_a_token(client, registry):
    resp = await lookup(client, macs=("52-54-00-AA-BB-01", "02:00:00:00:00:99"))
    assert resp.status == 200
    body = await resp.json()
    assert body["node"] == {"mac": MAC, "hostname": "store1", "role": "storage"}
    assert body["heartbeat_interval"] == 7.0
    assert isinstance(body["token"], str) and len(body["token"]) >= 32
    assert registry.lookup(MAC).state == NodeState.BOOTING


async def test_token_is_issued_once_per_boot_and_stored_hashed(client, registry):
    first = await (await lookup(client)).json()
    second = await (await lookup(client)).json()
    assert second["token"] is None
    assert second["node"] == first["node"]
    session = registry.agent_session(MAC)
    assert session.boot_id == BOOT
    assert session.token_hash == hashlib.sha256(first["token"].encode()).hexdigest()
    assert first["token"] not in session.token_hash
    # The repeated lookup did not invalidate the token.
    assert (await heartbeat(client, first["token"])).status == 200
    stages = [e.stage for e in registry.events(MAC)]
    assert stages.count("agent.lookup") == 2


async def test_first_heartbeat_makes_the_node_ready(client, registry):
    token = (await (await lookup(client)).json())["token"]
    resp = await heartbeat(client, token, status={"uptime": 12.5, "load": [0.1, 0.2, 0.3]})
    assert resp.status == 200
    assert await resp.json() == {"state": "ready", "heartbeat_interval": 7.0}
    node = registry.lookup(MAC)
    assert node.state == NodeState.READY
    assert node.last_heartbeat is not None
    assert node.facts["status"]["uptime"] == 12.5


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic abc"},
    {"Authorization": "Bearer "},
])
async def test_heartbeat_without_the_right_token_is_refused(client, registry, headers):
    await lookup(client)
    resp = await client.post("/api/v1/agent/heartbeat", headers=headers,
                             json={"mac": MAC, "boot_id": BOOT, "status": {}})
    assert resp.status == 401
    assert (await resp.json())["code"] == "unauthorized"
    assert registry.lookup(MAC).state == NodeState.BOOTING


async def test_token_is_bound_to_its_node_and_boot(client, registry):
    registry.add_node(NodeSpec(mac=OTHER, role="dom0"))
    token = (await (await lookup(client)).json())["token"]
    assert (await heartbeat(client, token, mac=OTHER)).status == 401
    assert (await heartbeat(client, token, boot_id="another-boot")).status == 401
    assert (await heartbeat(client, token, mac="02:00:00:00:00:77")).status == 401
    assert (await heartbeat(client, token, mac="not-a-mac")).status == 401


async def test_a_new_boot_invalidates_the_old_token(client):
    old = (await (await lookup(client)).json())["token"]
    new = (await (await lookup(client, boot_id="second-boot",
                              ticket=ticket_now(client))).json())["token"]
    assert new and new != old
    assert (await heartbeat(client, old)).status == 401
    assert (await heartbeat(client, old, boot_id="second-boot")).status == 401
    assert (await heartbeat(client, new, boot_id="second-boot")).status == 200


async def test_unknown_and_refused_lookups_get_the_same_answer(client, registry):
    registry.discover("52:54:00:aa:bb:0f", {"via": "dhcp"})  # pending: refused
    registry.add_node(NodeSpec(mac=OTHER, role="dom0"))
    answers = []
    for macs in (("02:00:00:00:00:55",), ("52:54:00:aa:bb:0f",), (MAC, OTHER)):
        resp = await lookup(client, macs=macs)
        answers.append((resp.status, await resp.read()))
    assert answers[0][0] == 404
    assert answers[0] == answers[1] == answers[2]
    assert registry.agent_session(MAC) is None


@pytest.mark.parametrize("body", [
    {}, {"macs": [], "boot_id": BOOT}, {"macs": "52:54:00:aa:bb:01", "boot_id": BOOT},
    {"macs": [MAC]}, {"macs": [MAC], "boot_id": "bad boot id"}, {"macs": ["zz"], "boot_id": BOOT},
    ["not", "an", "object"],
])
async def test_malformed_lookups_are_400(client, body):
    resp = await client.post("/api/v1/agent/lookup", json=body)
    assert resp.status == 400
    assert (await resp.json())["code"] == "invalid_request"


async def test_inventory_push_needs_the_token_and_is_stored(client, registry):
    token = (await (await lookup(client)).json())["token"]
    inventory = {"schema": 1, "disks": [{"name": "sda"}], "nics": []}
    refused = await client.post("/api/v1/agent/inventory",
                                headers={"Authorization": "Bearer nope"},
                                json={"mac": MAC, "boot_id": BOOT, "inventory": inventory})
    assert refused.status == 401
    assert registry.inventory(MAC) is None
    resp = await client.post("/api/v1/agent/inventory",
                             headers={"Authorization": f"Bearer {token}"},
                             json={"mac": MAC, "boot_id": BOOT, "inventory": inventory})
    assert resp.status == 200
    assert registry.inventory(MAC) == inventory


async def test_a_refused_push_is_answered_before_its_body_is_read(client, registry):
    # The token alone names the session: 401 (and 413 for a declared size over the limit)
    # before the client, waiting for "100 Continue", has sent a byte of the body.
    token = (await (await lookup(client)).json())["token"]
    sent = []

    async def body():
        sent.append(1)
        yield b'{"mac": "%s", "boot_id": "%s", "inventory": {}}' % (MAC.encode(), BOOT.encode())

    refused = await client.post("/api/v1/agent/inventory", data=body(), expect100=True,
                                headers={"Authorization": "Bearer nope",
                                         "Content-Type": "application/json"})
    assert refused.status == 401 and sent == []
    oversized = await client.post(
        "/api/v1/agent/inventory", data=b"x", expect100=True,
        headers={"Authorization": f"Bearer {token}", "Content-Length": str(5 * 2**20)})
    assert oversized.status == 413 and (await oversized.json())["code"] == "too_large"
    accepted = await client.post("/api/v1/agent/inventory", data=body(), expect100=True,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    assert accepted.status == 200 and sent == [1]
    assert registry.inventory(MAC) == {}


async def test_a_token_is_good_only_for_its_own_node_and_boot(client, registry):
    registry.add_node(NodeSpec(mac=OTHER, role="storage", hostname="store2"))
    token = (await (await lookup(client)).json())["token"]
    assert (await heartbeat(client, token, mac=OTHER)).status == 401
    assert (await heartbeat(client, token, boot_id="another-boot")).status == 401
    assert (await heartbeat(client, token)).status == 200


async def test_lookups_are_rate_limited_per_source(aiohttp_client, tmp_path, registry):
    app = make_app(tmp_path, registry)
    app[AGENT_API] = AgentApiState(limiter=LookupRateLimiter(rate=0.01, burst=3))
    client = await aiohttp_client(app)
    statuses = [(await lookup(client)).status for _ in range(3)]
    assert statuses == [200, 200, 200]
    limited = await lookup(client)
    assert limited.status == 429
    assert (await limited.json())["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1


def test_rate_limiter_refills_per_source():
    now = [100.0]
    limiter = LookupRateLimiter(rate=2.0, burst=2, clock=lambda: now[0])
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.acquire("b") == 0.0
    now[0] += 0.5
    assert limiter.acquire("a") == 0.0
    now[0] += 10
    limiter.forget_idle()
    assert limiter._buckets == {}


async def test_silent_ready_nodes_are_marked_lost(aiohttp_client, tmp_path, registry):
    client = await aiohttp_client(make_app(tmp_path, registry, heartbeat_interval=0.1,
                                           lost_after=0.3))
    token = (await (await lookup(client)).json())["token"]
    assert (await heartbeat(client, token)).status == 200
    assert registry.lookup(MAC).state == NodeState.READY
    assert await until_lost(registry, MAC, 4.0)
    # A heartbeat brings it back.
    assert (await heartbeat(client, token)).status == 200
    assert registry.lookup(MAC).state == NodeState.READY


async def until_lost(registry, mac, seconds):
    """Whether ``mac`` is marked lost within ``seconds`` (the sweep's background task)."""
    for _ in range(int(seconds * 10)):
        if registry.lookup(mac).state == NodeState.LOST:
            return True
        await asyncio.sleep(0.1)
    return registry.lookup(mac).state == NodeState.LOST


async def test_a_restarted_server_waits_lost_after_before_it_calls_anyone_lost(
        aiohttp_client, tmp_path, registry):
    first = await aiohttp_client(make_app(tmp_path, registry, lost_after=60))
    token = (await (await lookup(first)).json())["token"]
    assert (await heartbeat(first, token)).status == 200
    await first.close()
    await asyncio.sleep(1.6)  # the "outage": longer than the new server's lost_after
    await aiohttp_client(make_app(tmp_path, registry, heartbeat_interval=0.1, lost_after=1.5))
    await asyncio.sleep(1.0)  # sweeps ran (every 0.5 s), but the server is not up that long
    assert registry.lookup(MAC).state == NodeState.READY
    assert await until_lost(registry, MAC, 3.0)


async def test_a_silent_dom0_is_fenced_by_the_sweep_and_told_its_self_fence_limit(
        aiohttp_client, tmp_path, registry):
    registry.add_node(NodeSpec(mac=OTHER, role="dom0", hostname="dom0-9"))
    client = await aiohttp_client(make_app(tmp_path, registry, heartbeat_interval=0.1,
                                           lost_after=0.3))
    token = (await (await lookup(client, macs=(OTHER,))).json())["token"]
    answer = await (await heartbeat(client, token, mac=OTHER)).json()
    assert answer["self_fence_after"] == 0.2  # two thirds of lost_after
    stored = await (await heartbeat(client, (await (await lookup(client)).json())["token"])
                    ).json()
    assert "self_fence_after" not in stored  # a storage node has no guests to fence
    registry.create_instance(Instance(id="0123456789abcdef", name="web", memory=256 << 20,
                                      vcpus=1, volume=None))  # no disk: no storage to ask
    registry.start_instance("web", OTHER)
    for _ in range(40):
        await asyncio.sleep(0.1)
        if registry.instance("web").failover is not None:
            break
    assert registry.lookup(OTHER).state == NodeState.LOST
    fenced = registry.instance("web")
    assert fenced.actual == "unknown" and fenced.failover.source == OTHER
    assert fenced.failover.fenced and fenced.claim.node == OTHER  # no other dom0 to take it
    assert fenced.failover.reason.startswith("fenced, but not restarted yet: ")


NONCE = "n" * 43


async def test_a_lost_answer_is_recovered_with_the_same_nonce(client, registry):
    async def with_nonce(nonce, boot_id=BOOT):
        resp = await client.post("/api/v1/agent/lookup",
                                 json={"macs": [MAC], "boot_id": boot_id, "nonce": nonce})
        assert resp.status == 200
        return (await resp.json())["token"]

    first = await with_nonce(NONCE)
    assert first and await with_nonce(NONCE) == first
    assert await with_nonce("m" * 43) is None
    assert (await (await lookup(client)).json())["token"] is None
    assert registry.agent_session(MAC).token_hash == hashlib.sha256(first.encode()).hexdigest()
    details = [e.detail for e in registry.events(MAC) if e.stage == "agent.lookup"]
    assert [d.get("token_resent", False) for d in details] == [False, True, False, False]
    # A new boot with the same nonce gets a different token; the old one is dead.
    resp = await client.post("/api/v1/agent/lookup",
                             json={"macs": [MAC], "boot_id": "boot-2", "nonce": NONCE,
                                   "ticket": ticket_now(client)})
    rebooted = (await resp.json())["token"]
    assert rebooted and rebooted != first
    assert (await heartbeat(client, first)).status == 401
    assert (await heartbeat(client, rebooted, boot_id="boot-2")).status == 200


async def test_tokens_of_a_random_lookup_are_never_sent_again(client):
    assert (await (await lookup(client)).json())["token"]
    resp = await client.post("/api/v1/agent/lookup",
                             json={"macs": [MAC], "boot_id": BOOT, "nonce": NONCE})
    assert (await resp.json())["token"] is None


@pytest.mark.parametrize("nonce", ["short", 12, "x" * 129, "has space in it......."])
async def test_malformed_nonces_are_400(client, nonce):
    resp = await client.post("/api/v1/agent/lookup",
                             json={"macs": [MAC], "boot_id": BOOT, "nonce": nonce})
    assert resp.status == 400


async def test_a_ready_node_cannot_be_taken_over_by_a_lookup_with_a_new_boot(client):
    first = await (await lookup(client)).json()
    assert first["token"]
    assert (await heartbeat(client, first["token"])).status == 200
    stolen = await (await lookup(client, boot_id="boot-evil")).json()
    assert stolen["token"] is None
    assert (await heartbeat(client, first["token"])).status == 200


# -- finding: a ready node must not be taken over by anyone who knows its MAC ---------------


async def ready_node(client):
    """A node whose agent looked up and heartbeats: its token."""
    token = (await (await lookup(client)).json())["token"]
    assert (await heartbeat(client, token)).status == 200
    return token


async def test_a_boot_script_fetch_and_a_dhcp_discover_leave_a_ready_node_alone(client,
                                                                                registry):
    token = await ready_node(client)
    await client.get(f"/boot/{MAC}.ipxe")
    registry.record_event(MAC, "dhcp.discover", {"arch": 0}, booting=True)
    registry.record_event(MAC, "dhcp.request", {"arch": 0}, booting=True)
    await client.get(f"/api/v1/nodes/{MAC}/events")  # commits what is queued
    assert registry.lookup(MAC).state == NodeState.READY
    assert registry.agent_session(MAC).boot_id == BOOT
    assert (await heartbeat(client, token)).status == 200


async def test_no_token_for_a_new_boot_while_the_agent_heartbeats_even_with_a_ticket(client,
                                                                                    registry):
    token = await ready_node(client)
    # The attack: fetch the node's boot script (anyone can), then look up as a new boot.
    stolen = await (await lookup(client, boot_id="boot-evil",
                                 ticket=ticket_now(client))).json()
    assert stolen["token"] is None
    assert stolen["refused"] == "the node's agent is heartbeating"
    assert registry.agent_session(MAC).boot_id == BOOT
    assert (await heartbeat(client, token)).status == 200


@pytest.fixture
async def quick_client(aiohttp_client, tmp_path, registry):
    """Heartbeats every 0.2 s: an agent is silent after 1.5 s."""
    return await aiohttp_client(make_app(tmp_path, registry, heartbeat_interval=0.2))


async def test_a_silent_node_is_taken_over_only_with_a_fresh_genuine_ticket(quick_client,
                                                                            registry):
    client = quick_client
    old_token = await ready_node(client)
    old_beat = registry.lookup(MAC).last_heartbeat
    await asyncio.sleep(1.6)  # the old agent falls silent
    forged = ticket_now(client)[:-4] + "AAAA"
    before_beat = ticket_now(client, at=old_beat - 1)
    expired = ticket_now(client, at=time.time() - 1801)
    other_node = ticket_now(client, mac=OTHER)
    for ticket, reason in ((None, "no valid boot ticket"), (forged, "no valid boot ticket"),
                           (other_node, "no valid boot ticket"),
                           (before_beat, "the boot ticket is older than the current agent "
                                         "session"),
                           (expired, "the boot ticket has expired")):
        answer = await (await lookup(client, boot_id="boot-2", ticket=ticket)).json()
        assert (answer["token"], answer.get("refused")) == (None, reason)
    assert registry.agent_session(MAC).boot_id == BOOT
    ticket = ticket_now(client)
    await asyncio.sleep(0.01)
    new = await (await lookup(client, boot_id="boot-2", ticket=ticket)).json()
    assert new["token"] and "refused" not in new
    assert (await heartbeat(client, old_token)).status == 401
    assert (await heartbeat(client, new["token"], boot_id="boot-2")).status == 200
    # One ticket, one session: replaying it for a third boot fails even once boot-2 is silent.
    await asyncio.sleep(1.6)
    replay = await (await lookup(client, boot_id="boot-3", ticket=ticket)).json()
    assert replay["refused"] == "the boot ticket is older than the current agent session"


async def test_the_boot_script_carries_a_ticket_that_takes_over_a_silent_node(
        aiohttp_client, tmp_path, registry):
    images = tmp_path / "images" / "storage"
    images.mkdir(parents=True)
    for name in ("vmlinuz", "initramfs.img"):
        (images / name).write_bytes(b"x")
    (images / "manifest.json").write_text(
        '{"name": "storage", "kernel": "vmlinuz", "initramfs": "initramfs.img"}')
    client = await aiohttp_client(make_app(tmp_path, registry, heartbeat_interval=0.2))
    await ready_node(client)
    await asyncio.sleep(1.6)
    script = await (await client.get(f"/boot/{MAC}.ipxe")).text()
    assert registry.lookup(MAC).state == NodeState.READY  # fetching changed nothing
    ticket = next(w.partition("=")[2] for w in script.split()
                  if w.startswith("netboot.ticket="))
    new = await (await lookup(client, boot_id="boot-2", ticket=ticket)).json()
    assert new["token"]


@pytest.mark.parametrize("ticket", [12, "", "x" * 65, "has space", "a.b\n"])
async def test_malformed_tickets_are_400(client, ticket):
    resp = await lookup(client, ticket=ticket)
    assert resp.status == 400


def test_a_ticket_names_its_node_and_time_and_nothing_else_verifies():
    from configserver.http.tickets import ticket_time
    key = b"k" * 32
    ticket = issue_ticket(key, MAC, 1_700_000_000.25)
    assert ticket_time(key, MAC, ticket) == 1_700_000_000.25
    assert ticket_time(key, OTHER, ticket) is None
    assert ticket_time(b"j" * 32, MAC, ticket) is None
    assert ticket_time(key, MAC, ticket + "\n") is None
    stamp, _, tag = ticket.partition(".")
    assert ticket_time(key, MAC, f"{int(stamp, 16) + 1:x}.{tag}") is None
