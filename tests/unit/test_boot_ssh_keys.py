"""GET /boot/ssh-keys: root's public keys for every node, re-read on each fetch."""

from __future__ import annotations

import pytest

from configserver.config import HttpConfig, ServerConfig
from configserver.http.app import create_app
from configserver.http.boot import public_keys
from configserver.pki import CertificateAuthority
from configserver.registry.sqlite import SqliteRegistry

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA farm@lab"
KEY_B = "ecdsa-sha2-nistp256 AAAAE2VjZHNh ops@lab"


@pytest.fixture
async def serve(aiohttp_client, tmp_path):
    registries = []

    async def start(keys_file):
        registry = SqliteRegistry(tmp_path / f"reg{len(registries)}.sqlite")
        registries.append(registry)
        config = ServerConfig(state_dir=tmp_path, images_dir=tmp_path / "images",
                              ssh_keys=keys_file, http=HttpConfig(port=0))
        authority = CertificateAuthority.load_or_create(tmp_path / "pki")
        return await aiohttp_client(create_app(config, registry, authority))

    yield start
    for registry in registries:
        registry.close()


def test_only_public_key_lines_are_handed_out():
    text = (f"# admins\n{KEY_A}\n\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n"
            f"  {KEY_B}  \nssh-rsa\n")
    assert public_keys(text) == f"{KEY_A}\n{KEY_B}\n"


async def test_keys_are_served_and_a_change_shows_without_restart(serve, tmp_path):
    keys = tmp_path / "authorized_keys"
    keys.write_text(KEY_A + "\n")
    client = await serve(keys)
    resp = await client.get("/boot/ssh-keys")
    assert resp.status == 200
    assert await resp.text() == KEY_A + "\n"
    keys.write_text(f"{KEY_A}\n{KEY_B}\n")
    assert await (await client.get("/boot/ssh-keys")).text() == f"{KEY_A}\n{KEY_B}\n"


async def test_no_keys_configured_or_file_gone_is_a_404_with_a_reason(serve, tmp_path):
    client = await serve(None)
    resp = await client.get("/boot/ssh-keys")
    assert resp.status == 404
    assert (await resp.json())["code"] == "not_found"
    gone = await serve(tmp_path / "missing")
    resp = await gone.get("/boot/ssh-keys")
    assert resp.status == 404
    assert "missing" in (await resp.json())["message"]
