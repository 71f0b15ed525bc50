"""The agent's protocol loop against the real config server app, in-process on loopback."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import stat
import time

import aiohttp
import pytest

from configserver.config import HttpConfig, ServerConfig
from configserver.http.app import create_app
from configserver.http.appkeys import SECRET_KEY
from configserver.http.tickets import issue_ticket
from configserver.model import NodeSpec, NodeState
from configserver.pki import CertificateAuthority
from configserver.registry.sqlite import SqliteRegistry
from nodeagent import sdnotify
from nodeagent.api import create_local_app
from nodeagent.client import ServerClient
from nodeagent.config import build_config
from nodeagent.errors import ServerError
from nodeagent.session import AgentSession, Backoff
from nodeagent.watch import Debouncer

MAC = "52:54:00:aa:cc:01"
INVENTORY = {"schema": 1, "disks": [{"name": "sda"}], "nics": [{"name": "eth0", "mac": MAC}]}


@pytest.fixture
def registry(tmp_path):
    reg = SqliteRegistry(tmp_path / "state" / "registry.sqlite")
    reg.add_node(NodeSpec(mac=MAC, role="storage", hostname="store9"))
    yield reg
    reg.close()


def server_app(tmp_path, registry):
    config = ServerConfig(state_dir=tmp_path / "state", images_dir=tmp_path / "images",
                          http=HttpConfig(port=0, plain_agent_api=True),
                          heartbeat_interval=0.2, lost_after=30)
    return create_app(config, registry, CertificateAuthority.load_or_create(tmp_path / "pki"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Agent:
    """An AgentSession running as a task, with its own HTTP client."""

    def __init__(self, url, state_dir, boot_id="boot-1", boot_ticket=None):
        self.config = build_config({"server": url, "boot_id": boot_id, "state_dir": state_dir,
                                    "boot_ticket": boot_ticket,
                                    "macs": [MAC], "backoff_initial": 0.05,
                                    "backoff_max": 0.2, "api_port": 0})
        self.pushed = 0

    async def collect(self):
        self.pushed += 1
        return INVENTORY

    async def role_facts(self, role):
        return {"role": role, "plugin": role, "available": True}

    async def __aenter__(self):
        self.http = aiohttp.ClientSession()
        client = ServerClient(self.config.server, self.http, 2.0)
        self.session = AgentSession(self.config, client, self.collect, rng=random.Random(1),
                                    role_facts_source=self.role_facts,
                                    cloud_roles=lambda role, hooks: None)
        self.task = asyncio.create_task(self.session.run())
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        await self.http.close()

    async def until(self, predicate, timeout=10.0):
        for _ in range(int(timeout / 0.02)):
            if predicate():
                return
            assert not self.task.done(), self.task.exception()
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out; status {self.session.status.to_json()}")


async def test_agent_looks_up_heartbeats_and_pushes_inventory(aiohttp_server, tmp_path,
                                                               registry):
    server = await aiohttp_server(server_app(tmp_path, registry))
    async with Agent(str(server.make_url("")), tmp_path / "run") as agent:
        await agent.until(lambda: agent.session.status.heartbeats >= 3)
        await agent.until(lambda: agent.session.status.inventory_pushes >= 1)
        status = agent.session.status
        assert status.node.mac == MAC and status.node.hostname == "store9"
        assert status.phase == "heartbeat" and status.lookups == 1
    node = registry.lookup(MAC)
    assert node.state == NodeState.READY
    assert node.facts["status"]["role"]["plugin"] == "storage"
    assert node.facts["status"]["uptime"] > 0
    assert registry.inventory(MAC) == INVENTORY
    saved = tmp_path / "run" / "token.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text())["boot_id"] == "boot-1"


async def test_a_401_makes_the_agent_look_up_again(aiohttp_server, tmp_path, registry):
    server = await aiohttp_server(server_app(tmp_path, registry))
    async with Agent(str(server.make_url("")), tmp_path / "run") as agent:
        await agent.until(lambda: agent.session.status.heartbeats >= 1)
        first_token = agent.session.token
        # The server forgets the node's session (removed and registered again).
        registry.remove_node(MAC)
        registry.add_node(NodeSpec(mac=MAC, role="storage", hostname="store9"))
        await agent.until(lambda: agent.session.status.lookups >= 2)
        await agent.until(lambda: registry.lookup(MAC).state == NodeState.READY)
        assert agent.session.token != first_token
        await agent.until(lambda: agent.pushed >= 2)


async def test_unreachable_server_is_retried_until_it_comes(aiohttp_server, tmp_path,
                                                             registry):
    port = free_port()
    async with Agent(f"http://127.0.0.1:{port}", tmp_path / "run") as agent:
        await agent.until(lambda: agent.session.status.lookups >= 4)
        assert "cannot reach" in agent.session.status.last_error
        assert agent.session.status.phase == "lookup"
        await aiohttp_server(server_app(tmp_path, registry), port=port)
        await agent.until(lambda: registry.lookup(MAC).state == NodeState.READY)


async def test_restart_in_the_same_boot_gets_the_same_token_again(aiohttp_server, tmp_path,
                                                               registry):
    server = await aiohttp_server(server_app(tmp_path, registry))
    url = str(server.make_url(""))
    async with Agent(url, tmp_path / "run") as agent:
        await agent.until(lambda: agent.session.status.heartbeats >= 1)
    async with Agent(url, tmp_path / "run") as again:
        await again.until(lambda: again.session.status.heartbeats >= 2)
        assert again.session.token == agent.session.token
    # Without the saved nonce there is no way in for this boot.
    async with Agent(url, tmp_path / "elsewhere") as stranger:
        await stranger.until(lambda: stranger.session.status.lookups >= 3)
        assert stranger.session.status.heartbeats == 0
        assert "no token" in stranger.session.status.last_error
    # A new boot gets a new token once the old agent is silent, with its boot script's ticket.
    await asyncio.sleep(2.5 * 0.2 + 1.1)
    ticket = issue_ticket(server.app[SECRET_KEY], MAC, time.time())
    async with Agent(url, tmp_path / "elsewhere", boot_id="boot-2",
                     boot_ticket=ticket) as rebooted:
        await rebooted.until(lambda: rebooted.session.status.heartbeats >= 1)
        assert registry.agent_session(MAC).boot_id == "boot-2"


async def test_local_api_requires_the_agent_token(aiohttp_server, aiohttp_client, tmp_path,
                                                  registry):
    server = await aiohttp_server(server_app(tmp_path, registry))
    async with Agent(str(server.make_url("")), tmp_path / "run") as agent:
        local = await aiohttp_client(create_local_app(agent.session))
        assert (await local.get("/v1/status")).status == 401
        await agent.until(lambda: agent.session.status.inventory_pushes >= 1)
        token = agent.session.token
        for path in ("/v1/status", "/v1/inventory", "/v1/role", "/v1/nothing"):
            refused = await local.get(path, headers={"Authorization": "Bearer x" + token})
            assert refused.status == 401
            assert (await refused.json())["code"] == "unauthorized"
        auth = {"Authorization": f"Bearer {token}"}
        status = await (await local.get("/v1/status", headers=auth)).json()
        assert status["node"]["mac"] == MAC and status["boot_id"] == "boot-1"
        assert await (await local.get("/v1/inventory", headers=auth)).json() == INVENTORY
        role = await (await local.get("/v1/role", headers=auth)).json()
        assert role["role"] == "storage" and role["plugin"] == "storage"
        assert (await local.get("/v1/nothing", headers=auth)).status == 404


async def test_a_lost_lookup_answer_is_recovered(aiohttp_server, tmp_path, registry):
    server = await aiohttp_server(server_app(tmp_path, registry))
    async with Agent(str(server.make_url("")), tmp_path / "run") as agent:
        real_lookup = agent.session.client.lookup
        lost = []

        async def lookup_losing_the_first_answer(*args):
            answer = await real_lookup(*args)
            if not lost:
                lost.append(answer.token)
                raise ServerError("lookup: cannot reach the server: TimeoutError")
            return answer

        agent.session.client.lookup = lookup_losing_the_first_answer
        await agent.until(lambda: agent.session.status.heartbeats >= 1)
        assert lost[0] and agent.session.token == lost[0]
        assert agent.session.status.lookups == 2


def test_backoff_grows_with_jitter_to_a_cap():
    backoff = Backoff(1.0, 30.0, random.Random(7))
    delays = [backoff.next_delay() for _ in range(10)]
    for attempt, delay in enumerate(delays):
        ceiling = min(30.0, 2.0 ** attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays[6:]) <= 30.0 and min(delays[6:]) >= 15.0
    assert backoff.next_delay(at_least=25.0) >= 25.0
    backoff.reset()
    assert backoff.next_delay() <= 1.0


async def test_debouncer_fires_once_per_burst_and_caps_the_wait():
    loop = asyncio.get_running_loop()
    fired = []
    debouncer = Debouncer(lambda: fired.append(loop.time()), 0.1, 0.3)
    start = loop.time()
    for _ in range(5):
        debouncer.trigger()
    await asyncio.sleep(0.4)
    assert len(fired) == 1
    assert fired[0] - start >= 0.1
    # A steady stream of events (never quiet for 0.1 s) still fires, within `longest`.
    stream_start = loop.time()
    while loop.time() - stream_start < 1.0:
        debouncer.trigger()
        await asyncio.sleep(0.02)
    assert len(fired) >= 2
    debouncer.cancel()
    await asyncio.sleep(0.2)
    count = len(fired)
    await asyncio.sleep(0.2)
    assert len(fired) == count


def test_sdnotify_sends_ready_to_the_notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        assert sdnotify.notify(str(path), "READY=1", "STATUS=up")
        assert listener.recv(100) == b"READY=1\nSTATUS=up"
    assert not sdnotify.notify(None, "READY=1")
    assert not sdnotify.notify(str(tmp_path / "gone.sock"), "READY=1")
