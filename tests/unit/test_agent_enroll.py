"""POST /api/v1/agent/enroll: the boot's token (or the node's certificate) buys a node
certificate; heartbeats then authenticate with it, for the node's current boot only."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkitest import ADMIN, tls_client

from configserver.config import HttpConfig, ServerConfig
from configserver.http.app import create_app
from configserver.http.appkeys import SECRET_KEY
from configserver.http.tickets import issue_ticket
from configserver.model import NodeSpec, NodeState
from configserver.pki import Identity, identity_of
from configserver.pki.bundle import csr_for, new_key
from configserver.pki.tls import client_context
from configserver.registry.sqlite import SqliteRegistry

MAC = "52:54:00:aa:dd:01"
BOOT = "boot-0001"


@pytest.fixture
def registry(tmp_path):
    reg = SqliteRegistry(tmp_path / "state" / "registry.sqlite")
    reg.add_node(NodeSpec(mac=MAC, role="storage", hostname="store4", ip="198.18.0.44"))
    yield reg
    reg.close()


@pytest.fixture
async def anonymous(aiohttp_client, tmp_path, registry, pki):
    config = ServerConfig(state_dir=tmp_path / "state", images_dir=tmp_path / "images",
                          http=HttpConfig(port=0), heartbeat_interval=0.2)
    return await tls_client(aiohttp_client, create_app(config, registry, pki.authority), pki,
                            None)


async def token_of(client, boot_id=BOOT, ticket=None) -> str:
    body = {"macs": [MAC], "boot_id": boot_id}
    if ticket:
        body["ticket"] = ticket
    resp = await client.post("/api/v1/agent/lookup", json=body)
    return (await resp.json())["token"]


async def enroll(client, key, token=None, boot_id=BOOT):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await client.post("/api/v1/agent/enroll", headers=headers, json={
        "mac": MAC, "boot_id": boot_id, "csr": csr_for(key, "agent").decode()})


async def as_node(aiohttp_client, server, pki, tmp_path, *, key, pem: str):
    (tmp_path / "node.pem").write_text(pem)
    (tmp_path / "node.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = client_context(pki.authority.certificate_pem, cert=tmp_path / "node.pem",
                             key=tmp_path / "node.key")
    return await aiohttp_client(server, connector=aiohttp.TCPConnector(ssl=context))


async def test_the_token_buys_a_node_certificate_for_this_boot(anonymous, registry):
    token = await token_of(anonymous)
    assert (await enroll(anonymous, new_key(), token="wrong")).status == 401
    assert (await enroll(anonymous, new_key())).status == 401
    resp = await enroll(anonymous, new_key(), token=token)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    assert identity_of(cert) == Identity("node", MAC, boot_id=BOOT)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "store4" in sans.get_values_for_type(x509.DNSName)
    assert {str(a) for a in sans.get_values_for_type(x509.IPAddress)} == {"198.18.0.44",
                                                                         "127.0.0.1"}
    assert body["ca"].startswith("-----BEGIN CERTIFICATE")
    assert body["not_after"] - body["renew_after"] == pytest.approx(8 * 3600)
    assert "agent.enroll" in [e.stage for e in registry.events(MAC)]


async def test_heartbeats_with_the_certificate_of_the_current_boot_only(
        anonymous, aiohttp_client, registry, pki, tmp_path):
    key = new_key()
    pem = (await (await enroll(anonymous, key, token=await token_of(anonymous))).json())[
        "certificate"]
    node = await as_node(aiohttp_client, anonymous.server, pki, tmp_path, key=key, pem=pem)
    beat = {"mac": MAC, "boot_id": BOOT, "status": {}}
    resp = await node.post("/api/v1/agent/heartbeat", json=beat)
    assert resp.status == 200, await resp.text()
    assert registry.lookup(MAC).state == NodeState.READY
    # Renewal with the certificate instead of the token.
    resp = await enroll(node, new_key())
    assert resp.status == 200
    # A node certificate is for the agent endpoints only.
    assert (await node.get("/api/v1/nodes")).status == 403
    # The node reboots: its agent falls silent, the new boot's agent looks up with its boot
    # script's ticket and gets a new session; the old boot's certificate no longer counts.
    await asyncio.sleep(2.5 * 0.2 + 1.1)
    ticket = issue_ticket(anonymous.server.app[SECRET_KEY], MAC, time.time())
    assert await token_of(anonymous, boot_id="boot-0002", ticket=ticket)
    stale = await node.post("/api/v1/agent/heartbeat",
                            json={**beat, "boot_id": "boot-0002"})
    assert stale.status == 401
    assert (await node.post("/api/v1/agent/heartbeat", json=beat)).status == 401
    admin = await tls_client(aiohttp_client, anonymous.server, pki, ADMIN)
    assert (await admin.post("/api/v1/agent/heartbeat", json=beat)).status == 401


async def test_a_bad_csr_is_a_clear_400(anonymous):
    token = await token_of(anonymous)
    resp = await anonymous.post("/api/v1/agent/enroll", headers={
        "Authorization": f"Bearer {token}"}, json={"mac": MAC, "boot_id": BOOT, "csr": "x"})
    assert resp.status == 400 and (await resp.json())["code"] == "invalid_csr"
