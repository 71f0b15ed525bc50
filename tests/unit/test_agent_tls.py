"""The agent's side of x.509 identities against the real config server application: the CA
pinned by the command line, enrollment, heartbeats with mutual TLS, its own HTTPS API."""

from __future__ import annotations

import asyncio
import random
import socket

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pkitest import ADMIN, TENANT
from prometheus_client.parser import text_string_to_metric_families

from configserver.config import HttpConfig, ServerConfig
from configserver.http.app import create_app
from configserver.model import NodeSpec, NodeState
from configserver.pki import Identity
from configserver.registry.sqlite import SqliteRegistry
from nodeagent.api import create_local_app
from nodeagent.client import ServerClient
from nodeagent.config import build_config
from nodeagent.session import AgentSession

MAC = "52:54:00:aa:ee:01"
INVENTORY = {"schema": 1, "disks": [], "nics": []}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def registry(tmp_path):
    reg = SqliteRegistry(tmp_path / "state" / "registry.sqlite")
    reg.add_node(NodeSpec(mac=MAC, role="storage", hostname="store9"))
    yield reg
    reg.close()


@pytest.fixture
async def server(tmp_path, registry, pki):
    """The config server as its listeners split it: boot files over plain HTTP, the API over
    HTTPS at the URL that /boot/agent.json names. Yields the plain URL."""
    port = free_port()
    config = ServerConfig(state_dir=tmp_path / "state", images_dir=tmp_path / "images",
                          http=HttpConfig(port=0, plain_agent_api=False),
                          heartbeat_interval=0.2)
    app = create_app(config, registry, pki.authority, api_base=f"https://127.0.0.1:{port}")
    tls = TestServer(app, port=port)
    await tls.start_server(ssl=pki.server_context())
    site = web.TCPSite(tls.runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    await tls.close()


async def collect():
    return INVENTORY


async def role_facts(role):
    return {"role": role, "available": True}


async def run_agent(plain_url, state_dir, fingerprint, until, timeout=20.0):
    config = build_config({"server": plain_url, "boot_id": "boot-1", "state_dir": state_dir,
                           "macs": [MAC], "backoff_initial": 0.05, "backoff_max": 0.2,
                           "api_port": 0, "ca_fingerprint": fingerprint})
    async with aiohttp.ClientSession() as http:
        session = AgentSession(config, ServerClient(config.api_url, http, 2.0), collect,
                               rng=random.Random(1), role_facts_source=role_facts,
                               cloud_roles=lambda role, hooks: None)
        task = asyncio.create_task(session.run())
        try:
            async with asyncio.timeout(timeout):
                while not until(session):
                    await asyncio.sleep(0.05)
            return session
        finally:
            task.cancel()


async def test_the_agent_pins_the_ca_enrolls_and_heartbeats_with_its_certificate(
        server, tmp_path, registry, pki):
    fingerprint = pki.authority.fingerprint.removeprefix("sha256:")  # as the script has it
    session = await run_agent(server, tmp_path / "run", fingerprint,
                              lambda s: s.status.heartbeats >= 3
                              and s.status.inventory_pushes >= 1)
    assert session.client.base_url.startswith("https://127.0.0.1:")
    assert session.certificate is not None and session._credential() is None
    assert registry.lookup(MAC).state == NodeState.READY
    assert registry.inventory(MAC) == INVENTORY
    stages = [e.stage for e in registry.events(MAC)]
    assert stages.count("agent.enroll") == 1
    # The key stayed in the state directory (a tmpfs on a node), readable by root only.
    assert oct((tmp_path / "run" / "node.key").stat().st_mode & 0o777) == "0o600"


async def test_a_ca_other_than_the_pinned_one_gets_no_lookup(server, tmp_path, registry):
    session = await run_agent(server, tmp_path / "run", "B" * 43,
                              lambda s: s.status.last_error is not None, timeout=10)
    assert "is not the one this boot names" in session.status.last_error
    assert session.status.lookups == 0 and registry.agent_session(MAC) is None


async def test_the_agents_own_api_is_https_for_admins_and_nodes_only(
        server, tmp_path, pki, aiohttp_client):
    fingerprint = pki.authority.fingerprint
    session = await run_agent(server, tmp_path / "run", fingerprint,
                              lambda s: s.status.heartbeats >= 1)
    local = TestServer(create_local_app(session))
    await local.start_server(ssl=session.api_tls())
    url = f"https://127.0.0.1:{local.port}/v1/status"
    try:
        for identity, status in ((ADMIN, 200), (Identity("node", "52:54:00:aa:ee:02",
                                                         boot_id="b9"), 200),
                                 (TENANT, 401), (None, 401)):
            connector = aiohttp.TCPConnector(ssl=pki.client_context(identity))
            async with aiohttp.ClientSession(connector=connector) as http, \
                    http.get(url) as resp:
                assert resp.status == status, identity
        # Plain HTTP is not spoken there.
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientError):
                await http.get(f"http://127.0.0.1:{local.port}/v1/status")
    finally:
        await local.close()


async def test_the_agents_metrics_are_for_monitors_too_and_show_its_heartbeats(
        server, tmp_path, pki):
    session = await run_agent(server, tmp_path / "run", pki.authority.fingerprint,
                              lambda s: s.status.heartbeats >= 2)
    local = TestServer(create_local_app(session))
    await local.start_server(ssl=session.api_tls())
    base = f"https://127.0.0.1:{local.port}"
    monitor = Identity("monitor", "prometheus")
    try:
        connector = aiohttp.TCPConnector(ssl=pki.client_context(monitor))
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get(f"{base}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            # A monitor reads metrics, nothing else of the agent.
            async with http.get(f"{base}/v1/status") as resp:
                assert resp.status == 401
        for identity in (TENANT, None):
            connector = aiohttp.TCPConnector(ssl=pki.client_context(identity))
            async with aiohttp.ClientSession(connector=connector) as http, \
                    http.get(f"{base}/metrics") as resp:
                assert resp.status == 401, identity
    finally:
        await local.close()
    found = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert found["netboot_agent_heartbeats_total"].value >= 2
    assert found["netboot_agent_heartbeat_seconds_total"].value > 0
    assert found["netboot_agent_rss_bytes"].value > 10 * 1024 * 1024
    assert found["netboot_agent_info"].labels["mac"] == MAC
