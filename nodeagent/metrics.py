"""What the agent's ``GET /metrics`` shows, rendered by prometheus-client from the session's
own state when scraped: the agent's RSS, heartbeats and their latency, reconcile passes, and on
a dom0 each guest's CPU seconds, memory, network and disk bytes as its latest reconcile pass
read them (``xl list`` and sysfs, every few seconds; nothing is run for a scrape).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from nodeagent import __version__
from nodeagent.session import AgentSession, agent_rss_bytes

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A guest's counters in the dom0 role's report -> (metric, help). Bytes as the guest sees them.
GUEST_COUNTERS = {
    "cpu_seconds": ("netboot_guest_cpu_seconds", "CPU seconds the guest's domain used"),
    "net_rx_bytes": ("netboot_guest_network_receive_bytes", "Bytes the guest received"),
    "net_tx_bytes": ("netboot_guest_network_transmit_bytes", "Bytes the guest sent"),
    "disk_read_bytes": ("netboot_guest_disk_read_bytes", "Bytes the guest read from disk"),
    "disk_write_bytes": ("netboot_guest_disk_write_bytes", "Bytes the guest wrote to disk"),
}
GUEST_LABELS = ["guest", "guest_id", "domid"]


class AgentCollector(Collector):
    def __init__(self, session: AgentSession) -> None:
        self._session = session

    def collect(self) -> Iterator[Metric]:
        status = self._session.status
        node = status.node
        info = GaugeMetricFamily("netboot_agent_info", "The agent's version and node",
                                 labels=["version", "mac", "role", "boot_id"])
        info.add_metric([__version__, node.mac if node else "", (node.role or "") if node
                         else "", self._session.config.boot_id or ""], 1)
        yield info
        rss = agent_rss_bytes()
        if rss is not None:
            yield GaugeMetricFamily("netboot_agent_rss_bytes", "The agent's resident memory",
                                    value=rss)
        yield CounterMetricFamily("netboot_agent_heartbeats", "Heartbeats the config server "
                                  "accepted", value=status.heartbeats)
        yield CounterMetricFamily("netboot_agent_heartbeat_failures", "Heartbeats that "
                                  "failed (and were retried)", value=status.heartbeat_failures)
        yield CounterMetricFamily("netboot_agent_heartbeat_seconds", "Seconds the accepted "
                                  "heartbeats' round trips took, in all",
                                  value=status.heartbeat_seconds)
        if status.last_heartbeat_seconds is not None:
            yield GaugeMetricFamily("netboot_agent_heartbeat_last_seconds", "The latest "
                                    "accepted heartbeat's round trip",
                                    value=status.last_heartbeat_seconds)
        reconciler = self._session.reconciler
        if reconciler is None:
            return
        yield CounterMetricFamily("netboot_agent_reconcile_passes", "Reconcile passes that "
                                  "ended well", value=reconciler.status.passes)
        if reconciler.status.last_duration is not None:
            yield GaugeMetricFamily("netboot_agent_reconcile_last_seconds", "The latest "
                                    "reconcile pass's duration",
                                    value=reconciler.status.last_duration)
        guests = (reconciler.status.last_report or {}).get("guests")
        if isinstance(guests, list):
            yield from guest_metrics([g for g in guests if isinstance(g, dict)])


def guest_metrics(guests: list[dict[str, Any]]) -> Iterator[Metric]:
    """Per running guest: its counters, memory and state, labelled by name, id and domid."""
    running = [g for g in guests if isinstance(g.get("domid"), int)]
    counters = {key: CounterMetricFamily(name, text, labels=GUEST_LABELS)
                for key, (name, text) in GUEST_COUNTERS.items()}
    memory = GaugeMetricFamily("netboot_guest_memory_bytes", "Memory the guest's domain has",
                               labels=GUEST_LABELS)
    for guest in running:
        labels = [str(guest.get("domain", "")).removeprefix("nb-"), str(guest.get("id", "")),
                  str(guest["domid"])]
        for key, family in counters.items():
            value = guest.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                family.add_metric(labels, value)
        mib = guest.get("memory_mib")
        if isinstance(mib, int | float) and not isinstance(mib, bool):
            memory.add_metric(labels, mib * 1024 * 1024)
    yield from counters.values()
    yield memory
    states = GaugeMetricFamily("netboot_guests", "Guests this dom0 was told to run, by the "
                               "state it found them in", labels=["state"])
    for state in sorted({str(g.get("state")) for g in guests}):
        states.add_metric([state], sum(1 for g in guests if str(g.get("state")) == state))
    yield states


class AgentMetrics:
    """One registry per agent API application (never prometheus-client's global one)."""

    def __init__(self, session: AgentSession) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(AgentCollector(session))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "AgentMetrics", "guest_metrics"]
