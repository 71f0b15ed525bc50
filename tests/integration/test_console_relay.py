"""A guest's console end to end on loopback: the CLI's client, the config server's relay over
HTTPS, and the agent's console API over HTTPS with its node certificate, where a program on a
real pseudo-terminal stands in for ``xl console`` (the vm tier attaches to a real guest's)."""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
import time
import types

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from cloudtest import DOM0, cloud, dom0_report
from pkitest import ADMIN, TENANT

from configserver.cli import console as cli_console
from configserver.cloud.instances import Instance, InstanceNic
from configserver.config import HttpConfig, ServerConfig
from configserver.errors import NetbootError
from configserver.http.app import create_app
from configserver.http.client import ApiClient
from configserver.pki import Identity
from configserver.registry.sqlite import SqliteRegistry
from nodeagent.api import CONSOLES, create_local_app
from nodeagent.roles.console import Consoles

pytestmark = pytest.mark.integration

MIB = 1 << 20
# What a Debian guest's hvc0 shows, then an echoing line discipline's worth of cat.
GUEST = "printf 'Debian GNU/Linux 12 web hvc0\\r\\n\\r\\nweb login: '; exec cat"
OTHER = Identity("tenant", "olga", tenant="globex")


class Screen:
    """A terminal's stdout the test can wait on."""

    def __init__(self) -> None:
        self.data = b""
        self._changed = threading.Condition()

    def write(self, data: bytes) -> int:
        with self._changed:
            self.data += data
            self._changed.notify_all()
        return len(data)

    def flush(self) -> None:
        pass

    def wait_for(self, text: bytes, timeout: float = 10.0) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: text in self.data, timeout), self.data


class Said:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        pass


class Attached:
    """``configserver instance console`` in a thread, typing through a pipe."""

    def __init__(self, client: ApiClient, name: str, *, force: bool = False) -> None:
        self.screen, self.said = Screen(), Said()
        read, self._keys = os.pipe()
        self._stdin = os.fdopen(read, "rb", buffering=0)
        self.result: object = None
        self._thread = threading.Thread(target=self._run, args=(client, name, force))
        self._thread.start()

    def _run(self, client: ApiClient, name: str, force: bool) -> None:
        try:
            self.result = cli_console.attach(client, name, force=force, stdin=self._stdin,
                                             stdout=self.screen, stderr=self.said)
        except NetbootError as exc:
            self.result = exc

    def type(self, data: bytes) -> None:
        os.write(self._keys, data)

    def wait(self, timeout: float = 15.0) -> object:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the console did not end"
        os.close(self._keys)
        self._stdin.close()
        return self.result


def node_context(pki, identity: Identity) -> ssl.SSLContext:
    """The agent API's TLS: its node certificate, clients' certificates checked."""
    cert, key, _ = pki.bundle(identity)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                         cadata=pki.authority.certificate_pem.decode())
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_cert_chain(cert, key, password=b"test")
    return context


@pytest.fixture
def registry(tmp_path):
    reg = SqliteRegistry(tmp_path / "state" / "registry.sqlite")
    cloud(reg)
    reg.create_instance(Instance(id="0123456789abcdef", name="web", memory=256 * MIB,
                                 vcpus=1, volume=None, tenant="acme",
                                 nics=(InstanceNic("00:16:3e:00:00:01", "198.18.0.100"),)))
    reg.create_instance(Instance(id="fedcba9876543210", name="idle", memory=256 * MIB,
                                 vcpus=1, volume=None,
                                 nics=(InstanceNic("00:16:3e:00:00:02", "198.18.0.101"),)))
    started, _ = reg.start_instance("web", DOM0)
    body = dom0_report()
    body["dom0"]["guests"] = [{"id": started.id, "epoch": started.claim.epoch,
                               "state": "running", "domid": 3}]
    reg.record_cloud_report(DOM0, body)
    yield reg
    reg.close()


async def serve(tmp_path, registry, pki, agent_identity: Identity, program: str = GUEST):
    """The config server over HTTPS and dom0-1's agent API; returns (server, agent)."""
    agent_app = create_local_app(types.SimpleNamespace(token="t" * 32))
    agent_app[CONSOLES] = Consoles(argv=lambda domain: ["sh", "-c", program],
                                   running=_running)
    agent = TestServer(agent_app)
    await agent.start_server(ssl=node_context(pki, agent_identity))
    registry.record_heartbeat(DOM0, {"agent": {"api_port": agent.port},
                                     "address": "127.0.0.1"})
    config = ServerConfig(state_dir=tmp_path / "state", images_dir=tmp_path / "images",
                          http=HttpConfig(port=0))
    server = TestServer(create_app(config, registry, pki.authority))
    await server.start_server(ssl=pki.server_context())
    return server, agent


async def ended(agent: TestServer, timeout: float = 10.0) -> bool:
    """Whether the agent relays no console (any more) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while agent.app[CONSOLES].active() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return not agent.app[CONSOLES].active()


async def _running() -> list[str]:
    return ["nb-web"]


def client_for(server: TestServer, pki, identity: Identity) -> ApiClient:
    return ApiClient(f"https://127.0.0.1:{server.port}", tls=pki.client_context(identity),
                     timeout=10.0)


async def test_the_console_through_the_server_shows_the_login_and_ctrl_bracket_detaches(
        tmp_path, registry, pki):
    server, agent = await serve(tmp_path, registry, pki,
                                Identity("node", DOM0, boot_id="boot-dom0-1"))
    try:
        admin = client_for(server, pki, ADMIN)
        first = Attached(admin, "web")
        await asyncio.to_thread(first.screen.wait_for, b"web login: ")
        first.type(b"root\r")
        await asyncio.to_thread(first.screen.wait_for, b"root\r\n")  # echoed by the guest
        assert "Ctrl-] detaches" in "".join(first.said.lines)

        # A second client is refused while one is attached; --force takes it over.
        busy = await asyncio.to_thread(Attached(admin, "web").wait)
        assert isinstance(busy, NetbootError) and "attached by urn:netboot:admin:" in str(busy)
        tenant = client_for(server, pki, TENANT)  # the instance's own tenant
        second = Attached(tenant, "web", force=True)
        await asyncio.to_thread(second.screen.wait_for, b"web login: ")
        assert await asyncio.to_thread(first.wait) == 0
        assert "taken over by urn:netboot:tenant:" in "".join(first.said.lines)

        second.type(b"ls\r\x1dnot sent")  # Ctrl-]: what comes after it is not typed
        assert await asyncio.to_thread(second.wait) == 0
        assert b"not sent" not in second.screen.data
        assert await ended(agent), agent.app[CONSOLES].active()  # the program is gone

        # Refusals, each one clear: another tenant's, a stopped one, an unknown one.
        other = await asyncio.to_thread(Attached(client_for(server, pki, OTHER), "web").wait)
        assert isinstance(other, NetbootError) and "no instance 'web'" in str(other)
        idle = await asyncio.to_thread(Attached(admin, "idle").wait)
        assert isinstance(idle, NetbootError) and "not placed on any dom0" in str(idle)
    finally:
        await server.close()
        await agent.close()


@pytest.mark.parametrize("identity", [
    Identity("node", "52:54:00:00:d0:99", boot_id="boot-dom0-1"),  # another node
    Identity("node", DOM0, boot_id="an-earlier-boot"),  # dom0-1, but not its current boot
])
async def test_the_server_talks_only_to_the_agent_whose_certificate_names_the_dom0(
        tmp_path, registry, pki, identity):
    server, agent = await serve(tmp_path, registry, pki, identity)
    try:
        refused = await asyncio.to_thread(
            Attached(client_for(server, pki, ADMIN), "web").wait)
        assert isinstance(refused, NetbootError) and "is not dom0-1's" in str(refused)
        # Nothing was relayed, and the server hung up at once: the agent lets go.
        assert await ended(agent), agent.app[CONSOLES].active()
    finally:
        await server.close()
        await agent.close()


async def test_the_agent_opens_a_console_for_the_config_server_only(tmp_path, registry, pki):
    """A person's admin certificate goes through the server, which checks revocation and
    ownership; the agent itself takes only the server's own certificate (or its token)."""
    server, agent = await serve(tmp_path, registry, pki,
                                Identity("node", DOM0, boot_id="boot-dom0-1"))
    url = f"https://127.0.0.1:{agent.port}/v1/console/nb-web"
    try:
        for identity in (Identity("node", "52:54:00:00:d0:02", boot_id="b2"), TENANT, None,
                         ADMIN):
            connector = aiohttp.TCPConnector(ssl=_checking_nothing(pki, identity))
            async with aiohttp.ClientSession(connector=connector) as http:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(url)
                assert refused.value.status == 401, identity
        connector = aiohttp.TCPConnector(ssl=_checking_nothing(
            pki, Identity("admin", "configserver")))
        async with aiohttp.ClientSession(connector=connector) as http, \
                http.ws_connect(url.replace("nb-web", "Domain-0")) as websocket:
            message = await websocket.receive_json(timeout=5)
            assert message["error"]["code"] == "invalid_domain"  # never dom0's own console
        assert await ended(agent)
    finally:
        await server.close()
        await agent.close()


def _checking_nothing(pki, identity: Identity | None) -> ssl.SSLContext:
    """A client context with ``identity``'s certificate that accepts the agent's (a node
    certificate names a MAC, not 127.0.0.1)."""
    context = pki.client_context(identity)
    context.check_hostname = False
    return context


async def test_a_console_that_reads_nothing_is_taken_over_at_once(tmp_path, registry, pki):
    """A guest that reads no input (a raw terminal nobody reads: the pty fills up) does not
    keep its console from a --force attach."""
    server, agent = await serve(tmp_path, registry, pki,
                                Identity("node", DOM0, boot_id="boot-dom0-1"),
                                program="stty raw -echo; printf 'web login: '; exec sleep 600")
    try:
        admin = client_for(server, pki, ADMIN)
        stuck = Attached(admin, "web")
        await asyncio.to_thread(stuck.screen.wait_for, b"web login: ")
        stuck.type(b"x" * 65536)  # more than the pty takes: the agent's write waits
        await asyncio.sleep(0.5)
        began = time.monotonic()
        second = Attached(admin, "web", force=True)
        await asyncio.to_thread(second.screen.wait_for, b"web login: ")
        assert time.monotonic() - began < 8  # TAKEOVER (5 s) at most, not forever
        assert await asyncio.to_thread(stuck.wait) == 0
        second.type(b"\x1d")
        assert await asyncio.to_thread(second.wait) == 0
        assert await ended(agent)
    finally:
        await server.close()
        await agent.close()
