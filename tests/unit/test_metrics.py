"""``GET /metrics`` and the scrape targets of the config server: who may read them, and what
the exposition (parsed by prometheus-client's own parser) says of the registry, the DHCP
service, the HTTP side and boots."""

# ruff: noqa: F811 (the fixtures imported from other test modules are parameters here)
from __future__ import annotations

import pytest
from cloudtest import DOM0, GIB, cloud
from pkitest import TENANT, tls_client
from prometheus_client.parser import text_string_to_metric_families
from test_api import registry  # noqa: F401
from test_dhcp_codec import DHCLIENT_DISCOVER
from test_dhcp_service import FakeEndpoint
from test_dhcp_service import service as dhcp_service  # noqa: F401 (a fixture)

from configserver.cloud.instances import Instance
from configserver.cloud.model import Redundancy, VolumeState
from configserver.config import HttpConfig, ServerConfig
from configserver.dhcp.policy import DHCP_PORT
from configserver.http.app import create_app
from configserver.http.appkeys import METRICS
from configserver.model import NodeSpec, NodeState
from configserver.pki import Identity
from configserver.telemetry.collectors import DhcpCollector
from configserver.telemetry.metrics import ServerMetrics

MONITOR = Identity("monitor", "prometheus")
MAC = "52:54:00:aa:bb:01"
MIB = 1 << 20


@pytest.fixture
async def client(serve_split, pki, tmp_path, registry):
    config = ServerConfig(state_dir=tmp_path / "state", images_dir=tmp_path / "images",
                          ipxe_dir=tmp_path / "ipxe", http=HttpConfig(port=0))
    (tmp_path / "ipxe").mkdir()
    return await serve_split(create_app(config, registry, pki.authority,
                                        api_base="https://198.18.0.1:8443"))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


async def test_metrics_are_for_admins_and_monitors_over_https_only(client, aiohttp_client,
                                                                  pki):
    assert (await client.api.get("/metrics")).status == 200
    monitor = await tls_client(aiohttp_client, client.server, pki, MONITOR)
    resp = await monitor.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    assert (await monitor.get("/api/v1/prometheus/targets")).status == 200
    # A monitor reads metrics, nothing else.
    for path in ("/api/v1/nodes", "/api/v1/volumes", "/api/v1/users"):
        assert (await monitor.get(path)).status == 403, path
    tenant = await tls_client(aiohttp_client, client.server, pki, TENANT)
    nobody = await tls_client(aiohttp_client, client.server, pki, None)
    for path in ("/metrics", "/api/v1/prometheus/targets"):
        resp = await tenant.get(path)
        assert resp.status == 403 and "monitor" in (await resp.json())["hint"], path
        assert (await nobody.get(path)).status == 401, path
    plain = await client.plain.get("/metrics")
    assert plain.status == 403 and (await plain.json())["code"] == "https_required"
    assert "netboot_" not in await plain.text()


async def test_metrics_show_the_registry_and_the_requests(client, registry):
    registry.add_node(NodeSpec(mac=MAC, role="storage", hostname="s1"))
    registry.add_node(NodeSpec(mac="52:54:00:aa:bb:02", role="dom0", hostname="d1"))
    registry.set_state("52:54:00:aa:bb:02", NodeState.READY)
    cloud(registry)  # two ready storage nodes (and a dom0) with room
    registry.create_volume("v1", GIB, None, None)
    for name in ("web", "db"):
        registry.create_instance(Instance(id=f"id-{name}", name=name, memory=256 * MIB,
                                          vcpus=1, volume=None))
    registry.start_instance("web", DOM0)
    assert (await client.plain.get("/images/none/vmlinuz")).status == 404
    assert (await client.plain.get("/no/such/route")).status == 404
    text = await (await client.api.get("/metrics")).text()
    assert value(text, "netboot_nodes", role="storage", state="registered") == 1
    assert value(text, "netboot_nodes", role="storage", state="ready") == 2
    assert value(text, "netboot_nodes", role="dom0", state="ready") == 2
    assert value(text, "netboot_node_ready", mac="52:54:00:aa:bb:02", hostname="d1",
                 role="dom0") == 1
    assert value(text, "netboot_node_ready", mac=MAC, hostname="s1", role="storage") == 0
    assert value(text, "netboot_volumes", state=str(VolumeState.CREATING),
                 redundancy=str(Redundancy.UNKNOWN)) == 1
    assert value(text, "netboot_http_requests_total", route="/images/{image}/{name}",
                 method="GET", status="404") == 1
    assert value(text, "netboot_http_requests_total", route="(none)", method="GET",
                 status="404") == 1
    assert value(text, "netboot_instances", desired="running", actual="stopped") == 1
    assert value(text, "netboot_instances", desired="stopped", actual="stopped") == 1
    assert value(text, "netboot_instances_placed", node=DOM0) == 1
    assert value(text, "netboot_instances_memory_bytes", node=DOM0) == 256 * MIB
    # Registry writes were timed (the node and volume above).
    assert value(text, "netboot_registry_operation_seconds_count", operation="write") >= 3
    assert value(text, "netboot_event_loop_lag_seconds_count") is not None


async def test_targets_list_the_server_and_each_reachable_agent(client, registry):
    registry.add_node(NodeSpec(mac=MAC, role="dom0", hostname="d1"))
    registry.add_node(NodeSpec(mac="52:54:00:aa:bb:02", role="storage", hostname="s1"))
    registry.add_node(NodeSpec(mac="52:54:00:aa:bb:03", role="storage", hostname="s2"))
    for mac, port in ((MAC, 9898), ("52:54:00:aa:bb:02", None)):
        registry.set_state(mac, NodeState.READY)
        registry.record_heartbeat(mac, {"address": "198.18.0.10" if port else "198.18.0.11",
                                        "agent": {"api_port": port}})
    groups = await (await client.api.get("/api/v1/prometheus/targets")).json()
    assert groups[0] == {"targets": ["198.18.0.1:8443"], "labels": {
        "__scheme__": "https", "__metrics_path__": "/metrics",
        "netboot_component": "configserver"}}
    # Only the agent serving HTTPS off loopback (an api_port) is a target; s2 never heartbeat.
    assert groups[1:] == [{"targets": ["198.18.0.10:9898"], "labels": {
        "__scheme__": "https", "__metrics_path__": "/metrics", "netboot_component": "agent",
        "mac": MAC, "hostname": "d1", "role": "dom0"}}]


def test_dhcp_answers_and_drops_are_counted_by_type_and_reason(dhcp_service):
    metrics = ServerMetrics()
    metrics.add(DhcpCollector(lambda: dhcp_service))
    endpoint = FakeEndpoint()
    dhcp_service.handle_datagram(DHCLIENT_DISCOVER, ("0.0.0.0", 68), DHCP_PORT, endpoint)
    dhcp_service.handle_datagram(b"\x01garbage", ("198.18.0.9", 68), DHCP_PORT, endpoint)
    text = metrics.exposition().decode()
    assert value(text, "netboot_dhcp_packets_total", type="discover", answer="offer") == 1
    assert value(text, "netboot_dhcp_drops_total", reason="malformed") == 1
    assert value(text, "netboot_dhcp_drops_total", reason="error") == 0


def test_a_finished_boot_fills_the_stage_histograms():
    metrics = ServerMetrics()
    timeline = [{"stage": "dhcp", "time": 100.0}, {"stage": "tftp", "time": 101.5},
                {"stage": "script", "time": 103.0}, {"stage": "kernel", "time": 103.2},
                {"stage": "initramfs", "time": 110.0}, {"stage": "agent", "time": 140.0},
                {"stage": "ready", "time": 142.0}]
    metrics.boot_finished(timeline)
    metrics.boot_finished(timeline[:-1])  # not ready yet: nothing observed
    text = metrics.exposition().decode()
    assert value(text, "netboot_boot_stage_seconds_sum", stage="firmware") == pytest.approx(1.5)
    assert value(text, "netboot_boot_stage_seconds_sum", stage="initramfs") == 30.0
    assert value(text, "netboot_boot_stage_seconds_sum", stage="agent_ready") == 2.0
    assert value(text, "netboot_boot_stage_seconds_count", stage="dhcp") == 1
    assert value(text, "netboot_boot_seconds_sum") == 42.0


async def test_a_node_becoming_ready_observes_its_boot(client, registry):
    metrics = client.server.app[METRICS]
    registry.add_node(NodeSpec(mac=MAC, role="storage"))
    for stage in ("dhcp.discover", "http.script", "http.kernel", "http.initramfs",
                  "agent.lookup", "agent.heartbeat"):
        registry.record_event(MAC, stage, {"result": "linux"} if stage == "http.script"
                              else {})
    from configserver.http.metricsapi import observe_boot

    await observe_boot(client.server.app, MAC)
    text = metrics.exposition().decode()
    assert value(text, "netboot_boot_seconds_count") == 1
