"""The real Prometheus server (Debian's) finds the config server through our HTTP service
discovery, scrapes ``/metrics`` with a monitor's client certificate, and a PromQL query through
its HTTP API returns the DHCP answers the config server gave a real client (dhclient)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import netlab
import pytest
from netlab import Netns, namespaces, veth_pair
from test_dhcp_clients import NODE_IP, NODE_MAC, SERVER_IP, dhclient
from test_dhcp_serve import start_serve

from configserver.model import NodeSpec
from configserver.registry.sqlite import SqliteRegistry

pytestmark = pytest.mark.netns

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
CONFIGSERVER = Path(sys.executable).with_name("configserver")
PROM_PORT = 19090
DOCS = Path(__file__).resolve().parents[2] / "docs" / "prometheus"
HTTPS_PORT = 18443


def prometheus_config(bundle: Path, into: Path) -> Path:
    """docs/prometheus/prometheus.yml as shipped, with this test's bundle, server and a 1 s
    pace, and the example alerting rules beside it."""
    text = (DOCS / "prometheus.yml").read_text()
    for old, new in (("/etc/prometheus/netboot", str(bundle)),
                     ("configserver.example:8443", f"{SERVER_IP}:{HTTPS_PORT}"),
                     ("15s", "1s"), ("30s", "1s")):
        assert old in text, old
        text = text.replace(old, new)
    into.mkdir()
    shutil.copy(DOCS / "netboot-alerts.yml", into)
    (into / "prometheus.yml").write_text(text.replace("scrape_interval: 1s",
                                                      "scrape_interval: 1s\n  scrape_timeout: 1s"))
    return into / "prometheus.yml"


def test_the_example_rules_pass_promtool_and_their_own_tests():
    for check in (("check", "rules", "netboot-alerts.yml"),
                  ("test", "rules", "netboot-alerts.test.yml")):
        done = subprocess.run(["promtool", *check], check=False, cwd=DOCS,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def query(ns: Netns, promql: str) -> list[dict]:
    url = (f"http://127.0.0.1:{PROM_PORT}/api/v1/query?"
           + urllib.parse.urlencode({"query": promql}))
    answer = json.loads(ns.run("curl", "-sf", url, timeout=10).stdout)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def test_prometheus_discovers_scrapes_and_answers_with_the_dhcp_answers(tmp_path):
    assert Path(PROMETHEUS).exists(), "Debian's prometheus package (make deps)"
    state = tmp_path / "state"
    state.mkdir()
    with namespaces(2, "nbprom") as (server_ns, client_ns):
        veth_pair(server_ns, client_ns, f"{SERVER_IP}/24", "")
        client_ns.ip("link", "set", "eth0", "address", NODE_MAC)
        registry = SqliteRegistry(state / "registry.sqlite")
        registry.add_node(NodeSpec(mac=NODE_MAC, role="storage", hostname="metered-1",
                                   ip=NODE_IP))
        registry.close()
        server = start_serve(server_ns, state, "--dhcp", "full", "--https-port",
                             str(HTTPS_PORT))
        prometheus = None
        try:
            bundle = tmp_path / "bundle"
            subprocess.run([str(CONFIGSERVER), "--state-dir", str(state), "user", "add",
                            "prometheus", "--monitor", "--out", str(bundle)], check=True,
                           capture_output=True, timeout=30)
            config = prometheus_config(bundle, tmp_path / "etc")
            check = subprocess.run(["promtool", "check", "config", str(config)],
                                   check=False, capture_output=True, text=True, timeout=60)
            assert check.returncode == 0, check.stdout + check.stderr
            prometheus = server_ns.popen(
                PROMETHEUS, f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{PROM_PORT}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                stdout=(tmp_path / "prometheus.log").open("w"), stderr=subprocess.STDOUT)
            lease = dhclient(client_ns, tmp_path)
            assert f"fixed-address {NODE_IP};" in lease, (state / "serve.log").read_text()

            def scraped() -> list[dict]:
                return query(server_ns, 'up{netboot_component="configserver"} == 1')
            netlab.wait_for(scraped, 60, "Prometheus to discover and scrape the server",
                            process=prometheus, log=tmp_path / "prometheus.log")

            def acks() -> list[dict]:
                return query(server_ns, 'netboot_dhcp_packets_total{answer="ack"} > 0')
            found = netlab.wait_for(acks, 30, "the ACK in Prometheus", process=prometheus,
                                    log=tmp_path / "prometheus.log")
            # As many as the server's own timeline of the node holds (dhclient may ask twice).
            timeline = SqliteRegistry(state / "registry.sqlite")
            try:
                stages = [e.stage for e in timeline.events(NODE_MAC)]
            finally:
                timeline.close()
            assert stages.count("dhcp.ack") >= 1
            assert [(r["metric"]["type"], float(r["value"][1])) for r in found] == [
                ("request", stages.count("dhcp.ack"))]
            offers = query(server_ns, 'netboot_dhcp_packets_total{answer="offer"}')
            assert [float(r["value"][1]) for r in offers] == [stages.count("dhcp.offer")]
            nodes = query(server_ns, 'netboot_nodes{role="storage"}')
            assert sum(float(r["value"][1]) for r in nodes) == 1
            # The target's scheme and path came from our discovery document.
            targets = json.loads(server_ns.run(
                "curl", "-sf", f"http://127.0.0.1:{PROM_PORT}/api/v1/targets").stdout)
            active = targets["data"]["activeTargets"]
            assert [t["scrapeUrl"] for t in active] == [
                f"https://{SERVER_IP}:{HTTPS_PORT}/metrics"], active
            # The example alerting rules are loaded and evaluated (none fires here).
            rules = json.loads(server_ns.run(
                "curl", "-sf", f"http://127.0.0.1:{PROM_PORT}/api/v1/rules").stdout)
            loaded = [r for g in rules["data"]["groups"] for r in g["rules"]]
            assert len(loaded) == 5 and all(r["health"] == "ok" for r in loaded), loaded
        finally:
            if prometheus is not None:
                netlab.stop(prometheus, 15)
            netlab.stop(server, 15)
