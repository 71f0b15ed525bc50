"""``POST /api/v1/agent/claim``: a dom0's last check before ``xl create``."""

from __future__ import annotations

import pytest
from cloudtest import DOM0, DOM0B, cloud
from pkitest import tls_client

from configserver.cloud.instances import Instance
from configserver.cloud.model import MIB
from configserver.config import HttpConfig, ServerConfig
from configserver.http.agentapi import hash_token
from configserver.http.app import create_app
from configserver.registry.sqlite import SqliteRegistry


@pytest.fixture
def registry(tmp_path):
    reg = SqliteRegistry(tmp_path / "state" / "registry.sqlite")
    cloud(reg, dom0s=2)
    reg.create_instance(Instance(id="0123456789abcdef", name="web", memory=256 * MIB,
                                 vcpus=1, volume=None))
    yield reg
    reg.close()


@pytest.fixture
async def client(aiohttp_client, tmp_path, registry, pki):
    (tmp_path / "images").mkdir()
    config = ServerConfig(state_dir=tmp_path / "state", images_dir=tmp_path / "images",
                          http=HttpConfig(port=8080, public_url="http://198.18.0.1:8080"))
    app = create_app(config, registry, pki.authority, secret_key=b"s" * 32)
    return await tls_client(aiohttp_client, app, pki, None)


def agent(registry, mac, token):
    registry.start_agent_session(mac, f"boot-{mac}", hash_token(token))
    registry.record_heartbeat(mac, {})
    return {"Authorization": f"Bearer {token}"}, {"mac": mac, "boot_id": f"boot-{mac}"}


async def ask(client, headers, who, **body):
    resp = await client.post("/api/v1/agent/claim", headers=headers, json={**who, **body})
    return resp.status, await resp.json()


async def test_only_the_holder_with_the_current_epoch_is_told_yes(client, registry):
    a_headers, a = agent(registry, DOM0, "a" * 32)
    b_headers, b = agent(registry, DOM0B, "b" * 32)
    assert (await ask(client, a_headers, a, instance="web", epoch=1))[0] == 409
    registry.start_instance("web", DOM0)
    assert await ask(client, a_headers, a, instance="web", epoch=1) == (
        200, {"held": True, "epoch": 1})
    status, body = await ask(client, b_headers, b, instance="web", epoch=1)
    assert status == 409 and body["node"] == DOM0 and body["held"] is False
    assert (await ask(client, a_headers, a, instance="web", epoch=0))[0] == 409
    registry.stop_instance("web")  # wanted stopped: no creating it any more
    assert (await ask(client, a_headers, a, instance="web", epoch=1))[0] == 409
    assert (await ask(client, a_headers, a, instance="nope", epoch=1))[0] == 409


@pytest.mark.parametrize("body", [{}, {"instance": "web"}, {"instance": "web", "epoch": "1"},
                                  {"instance": 3, "epoch": 1},
                                  {"instance": "web", "epoch": True}])
async def test_malformed_questions_are_refused(client, registry, body):
    headers, who = agent(registry, DOM0, "a" * 32)
    assert (await ask(client, headers, who, **body))[0] == 400


async def test_the_session_is_needed(client, registry):
    headers, who = agent(registry, DOM0, "a" * 32)
    status, _ = await ask(client, {}, who, instance="web", epoch=1)
    assert status == 401
    status, _ = await ask(client, headers, {**who, "boot_id": "old"}, instance="web", epoch=1)
    assert status == 401
