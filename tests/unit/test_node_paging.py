"""The node list in pages: the registry's limit/after, GET /api/v1/nodes?limit=&after=, and
the CLI's ``node list`` paging through it."""

from __future__ import annotations

import asyncio

import pytest

from configserver.cli.main import list_all_nodes
from configserver.config import HttpConfig, ServerConfig
from configserver.http.app import create_app
from configserver.http.client import ApiClient
from configserver.model import NodeSpec, NodeState
from configserver.registry.sqlite import SqliteRegistry


def mac(n: int) -> str:
    return f"52:54:00:00:{n // 256:02x}:{n % 256:02x}"


@pytest.fixture
def registry(tmp_path):
    reg = SqliteRegistry(tmp_path / "state" / "registry.sqlite")
    # Registered out of order: the list is in MAC order whatever the insertion order.
    reg.apply([NodeSpec(mac(n), "storage") for n in (*range(30, 60), *range(30))])
    yield reg
    reg.close()


def pages(registry, size, **kwargs):
    after, seen = None, []
    while True:
        page = registry.list_nodes(limit=size, after=after, **kwargs)
        assert len(page) <= size
        seen.append([n.mac for n in page])
        if len(page) < size:
            return seen
        after = page[-1].mac


@pytest.mark.parametrize("size", [1, 7, 30, 60, 100])
def test_pages_cover_every_node_once_in_mac_order(registry, size):
    macs = [m for page in pages(registry, size) for m in page]
    assert macs == sorted(mac(n) for n in range(60))


def test_a_page_starts_after_any_mac_known_or_not(registry):
    assert [n.mac for n in registry.list_nodes(limit=3, after=mac(10))] == [
        mac(11), mac(12), mac(13)]
    assert [n.mac for n in registry.list_nodes(limit=2, after="52:54:00:00:00:0a:ff")] == [
        mac(11), mac(12)]  # a cursor need not be a node's MAC
    assert registry.list_nodes(limit=5, after="ff:ff:ff:ff:ff:ff") == []


async def test_pages_show_queued_state_changes_and_discoveries(registry):
    for n in range(0, 60, 2):
        registry.record_event(mac(n), "dhcp.discover", booting=True)  # queued, not committed
    registry.discover(mac(300), {"arch": 7})
    booting = [m for page in pages(registry, 4, state=NodeState.BOOTING) for m in page]
    assert booting == [mac(n) for n in range(0, 60, 2)]
    registered = [m for page in pages(registry, 4, state=NodeState.REGISTERED) for m in page]
    assert registered == [mac(n) for n in range(1, 60, 2)]
    everything = [m for page in pages(registry, 7) for m in page]
    assert everything[-1] == mac(300) and len(everything) == 61


@pytest.fixture
async def client(serve_split, pki, tmp_path, registry):
    config = ServerConfig(state_dir=tmp_path / "state", images_dir=tmp_path / "images",
                          ipxe_dir=tmp_path / "ipxe", http=HttpConfig(port=0))
    return await serve_split(create_app(config, registry, pki.authority))


async def test_the_api_pages_with_a_cursor(client):
    first = await (await client.get("/api/v1/nodes?limit=25")).json()
    assert [n["mac"] for n in first["nodes"]] == [mac(n) for n in range(25)]
    assert first["next"] == mac(24)
    second = await (await client.get(f"/api/v1/nodes?limit=25&after={first['next']}")).json()
    third = await (await client.get(f"/api/v1/nodes?limit=25&after={second['next']}")).json()
    assert [n["mac"] for n in third["nodes"]] == [mac(n) for n in range(50, 60)]
    assert third["next"] is None
    exact = await (await client.get(f"/api/v1/nodes?limit=10&after={mac(49)}")).json()
    assert len(exact["nodes"]) == 10 and exact["next"] is None  # no empty page to fetch
    everything = await (await client.get("/api/v1/nodes")).json()  # default page: 500
    assert len(everything["nodes"]) == 60 and everything["next"] is None
    for query, code in (("limit=x", "invalid_request"), ("after=nonsense", "invalid_mac"),
                        ("state=asleep", "invalid_request")):
        resp = await client.get(f"/api/v1/nodes?{query}")
        assert resp.status == 400 and (await resp.json())["code"] == code


async def test_the_cli_node_list_pages_through_everything(client, pki):
    api = ApiClient(str(client.make_url("")).rstrip("/"), tls=pki.client_context())
    nodes = await asyncio.to_thread(list_all_nodes, api, page=7)  # 9 requests
    assert [n["mac"] for n in nodes] == [mac(n) for n in range(60)]
    pending = await asyncio.to_thread(list_all_nodes, api, state="pending", page=7)
    assert pending == []
