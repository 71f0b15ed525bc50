"""The example alerting rules and the Grafana dashboard in docs/ name only metrics that the
config server and the agents export (promtool checks the rules themselves: netns tier)."""

from __future__ import annotations

import json
import re
import types
from collections import Counter
from pathlib import Path

import pytest

from configserver.telemetry.collectors import DhcpCollector, RegistryCollector, TftpCollector
from configserver.telemetry.metrics import ServerMetrics
from nodeagent.metrics import AgentCollector
from nodeagent.roles import ReconcileStatus
from nodeagent.session import AgentStatus

DOCS = Path(__file__).resolve().parents[2] / "docs"
NAME = re.compile(r"\bnetboot_[a-z0-9_]+\b")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("_sum", "_count"), "gauge": ("",), "info": ("_info",)}


class EmptyRegistry:
    def list_nodes(self):
        return []

    def instance_counts(self):
        return []

    def volumes(self):
        return []


def exported() -> set[str]:
    """Every sample name /metrics can show, on the config server and on an agent."""
    metrics = ServerMetrics()
    metrics.add(RegistryCollector(EmptyRegistry()))
    metrics.add(DhcpCollector(lambda: types.SimpleNamespace(
        packets=Counter(), drops=Counter(), pending_expired=0)))
    metrics.add(TftpCollector(types.SimpleNamespace(
        completed=0, failed=0, bytes_sent=0, retransmissions=0, refused=Counter(),
        transfers={})))
    status = AgentStatus(last_heartbeat_seconds=0.01)
    session = types.SimpleNamespace(status=status, config=types.SimpleNamespace(boot_id="b"),
                                    reconciler=types.SimpleNamespace(status=ReconcileStatus(
                                        passes=1, last_duration=0.5,
                                        last_report={"guests": []})))
    families = [*metrics.registry.collect(), *AgentCollector(session).collect()]
    return {family.name + suffix for family in families
            for suffix in SUFFIXES[family.type]}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DOCS / "grafana" / "netboot-dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def rule_exprs() -> list[str]:
    text = (DOCS / "prometheus" / "netboot-alerts.yml").read_text()
    # Each expr is one line or a block (|) of indented lines after it.
    return re.findall(r"expr: (?:\|\n((?:\s{10}.*\n)+)|(.*))", text)


@pytest.mark.parametrize("where", ["dashboard", "alerts"])
def test_the_examples_name_only_exported_metrics(where):
    exprs = dashboard_exprs() if where == "dashboard" else [
        block or line for block, line in rule_exprs()]
    names = {name for expr in exprs for name in NAME.findall(expr)}
    assert len(exprs) >= 5 and len(names) >= 5, exprs
    unknown = names - exported()
    assert not unknown, f"{where} names metrics nobody exports: {sorted(unknown)}"


def test_the_dashboard_is_importable_grafana_json():
    dashboard = json.loads((DOCS / "grafana" / "netboot-dashboard.json").read_text())
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] and dashboard["title"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        assert panel["targets"] and all(t["refId"] and t["expr"] for t in panel["targets"])
