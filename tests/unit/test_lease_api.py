"""The operator's purges: leases of unregistered MACs, pending nodes (API; CLI in integration)."""

from __future__ import annotations

import pytest
from pkitest import tls_client

from configserver.config import DhcpConfig, DhcpMode, HttpConfig, ServerConfig, Subnet
from configserver.dhcp.leases import LeaseStore
from configserver.dhcp.policy import DhcpPolicy
from configserver.dhcp.service import DhcpService
from configserver.http.app import create_app
from configserver.http.leaseapi import DHCP
from configserver.model import NodeSpec
from configserver.registry.sqlite import SqliteRegistry

NODE = "52:54:00:aa:bb:01"


@pytest.fixture
async def setup(aiohttp_client, serve_split, pki, tmp_path):
    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    registry.add_node(NodeSpec(mac=NODE, role="storage"))
    leases = LeaseStore(tmp_path / "leases.sqlite")
    config = ServerConfig(state_dir=tmp_path, images_dir=tmp_path, http=HttpConfig(port=0),
                          dhcp=DhcpConfig(mode=DhcpMode.FULL, subnet=Subnet(
                              "198.18.0.0/24", pool=("198.18.0.100", "198.18.0.200"))))
    policy = DhcpPolicy(config.dhcp, registry, leases, server_address="198.18.0.1",
                        http_base="http://198.18.0.1:8080", tftp_enabled=False)
    app = create_app(config, registry, pki.authority)
    client = await serve_split(app)
    nobody = await tls_client(aiohttp_client, client.server, pki, None)
    service = DhcpService(config, registry, leases, policy)
    yield client, app, service, registry, leases, nobody
    leases.close()
    registry.close()


async def test_lease_list_and_purge_of_unregistered_macs(setup):
    client, app, service, _, leases, nobody = setup
    answer = await client.get("/api/v1/leases")
    assert answer.status == 503 and (await answer.json())["code"] == "server_unavailable"
    app[DHCP].service = service
    leases.bind(NODE, "198.18.0.100", 3600)
    for i in range(5):
        leases.bind(f"02:00:00:00:00:{i:02x}", f"198.18.0.{110 + i}", 300)
    leases.offer("02:00:00:00:01:00", "198.18.0.120", 60)
    listed = (await (await client.get("/api/v1/leases")).json())["leases"]
    assert len(listed) == 7 and [x["registered"] for x in listed].count(True) == 1
    unknown = (await (await client.get("/api/v1/leases?unknown=1")).json())["leases"]
    assert len(unknown) == 6 and NODE not in {x["mac"] for x in unknown}
    assert (await nobody.post("/api/v1/leases/purge", json={"unknown": True})).status == 401
    assert (await client.post("/api/v1/leases/purge", json={})).status == 400
    purged = await client.post("/api/v1/leases/purge", json={"unknown": True})
    assert purged.status == 200 and len((await purged.json())["purged"]) == 6
    listed = (await (await client.get("/api/v1/leases")).json())["leases"]
    assert [x["mac"] for x in listed] == [NODE]
    # Stored: a restart does not bring the purged leases back.
    leases.flush()
    again = LeaseStore(leases.path)
    try:
        assert [x.mac for x in again if x.active(again.now())] == [NODE]
    finally:
        again.close()


async def test_node_purge_of_pending_nodes(setup):
    client, _, _, registry, _, nobody = setup
    for i in range(3):
        registry.discover(f"02:00:00:00:02:{i:02x}", {})
    registry.flush()
    bad = await client.post("/api/v1/nodes/purge", json={"state": "ready"})
    assert bad.status == 400
    bad = await client.post("/api/v1/nodes/purge", json={"state": "pending",
                                                          "older_than": "1h"})
    assert bad.status == 400
    assert (await nobody.post("/api/v1/nodes/purge", json={"state": "pending"})).status == 401
    young = await client.post("/api/v1/nodes/purge", json={"state": "pending",
                                                           "older_than": 3600})
    assert (await young.json())["removed"] == []
    answer = await client.post("/api/v1/nodes/purge", json={"state": "pending"})
    assert len((await answer.json())["removed"]) == 3
    assert registry.lookup(NODE) is not None
    assert [n.mac for n in registry.list_nodes()] == [NODE]
