"""Collectors that read, when scraped, what the services count and what the registry holds.

Each ``collect`` runs in the thread that renders ``/metrics`` (never the event loop's): the
DHCP and TFTP services' counters are plain ints and ``collections.Counter`` objects that the
loop alone changes, so a scrape copies them first; the registry is read through its own
per-thread connection.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from configserver.model import NodeState
from configserver.registry import Registry
from configserver.tftp.codec import ErrorCode

log = logging.getLogger(__name__)


class DhcpCounts(Protocol):
    packets: Counter[tuple[str, str]]
    drops: Counter[str]
    pending_expired: int


class TftpCounts(Protocol):
    completed: int
    failed: int
    bytes_sent: int
    retransmissions: int
    refused: Counter[int]
    transfers: dict[Any, Any]


class DhcpCollector(Collector):
    """``netboot_dhcp_*``: requests by message type and answer, drops by reason."""

    def __init__(self, service: Callable[[], DhcpCounts | None]) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        service = self._service()
        if service is None:
            return
        packets = CounterMetricFamily(
            "netboot_dhcp_packets", "DHCP requests decoded, by message type and the answer "
            "given (none: not answered)", labels=["type", "answer"])
        for (asked, answer), count in sorted(dict(service.packets).items()):
            packets.add_metric([asked, answer], count)
        yield packets
        drops = CounterMetricFamily(
            "netboot_dhcp_drops", "DHCP datagrams not answered, by reason (malformed, "
            "unlisted_relay, error, ignored: the policy chose silence)", labels=["reason"])
        for reason in ("malformed", "unlisted_relay", "error", "ignored"):
            drops.add_metric([reason], service.drops.get(reason, 0))
        yield drops
        yield CounterMetricFamily("netboot_dhcp_pending_expired",
                                  "Pending (discovered) nodes removed for silence",
                                  value=service.pending_expired)


class TftpCollector(Collector):
    """``netboot_tftp_*``: transfers by result, bytes, retransmissions, refusals."""

    def __init__(self, service: TftpCounts) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        s = self._service
        transfers = CounterMetricFamily("netboot_tftp_transfers", "TFTP transfers ended, "
                                        "by result", labels=["result"])
        transfers.add_metric(["complete"], s.completed)
        transfers.add_metric(["failed"], s.failed)
        yield transfers
        yield CounterMetricFamily("netboot_tftp_bytes", "Bytes of ended TFTP transfers "
                                  "acknowledged by their clients", value=s.bytes_sent)
        yield CounterMetricFamily("netboot_tftp_retransmits", "Windows sent again after a "
                                  "timeout, in ended transfers", value=s.retransmissions)
        errors = CounterMetricFamily("netboot_tftp_errors", "Requests refused with a TFTP "
                                     "ERROR, by its code", labels=["code"])
        for code, count in sorted(dict(s.refused).items()):
            errors.add_metric([_code_name(code)], count)
        yield errors
        yield GaugeMetricFamily("netboot_tftp_active_transfers", "TFTP transfers running",
                                value=len(s.transfers))


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return str(code)


class RegistryCollector(Collector):
    """Nodes by role and state, instances by desired and actual state, volumes by state and
    redundancy, and the registry writer's queue; read from the registry when scraped."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self._nodes()
        yield from self._cloud()
        writer = getattr(self._registry, "writer", None)
        if writer is not None:
            yield GaugeMetricFamily("netboot_registry_queued_writes", "Registry writes "
                                    "queued for the next commit", value=writer.queued)
            yield CounterMetricFamily("netboot_registry_dropped_events", "Boot events "
                                      "dropped because the writer was behind",
                                      value=writer.dropped)

    def _nodes(self) -> Iterator[Metric]:
        nodes = self._registry.list_nodes()
        counts: Counter[tuple[str, str]] = Counter(
            (node.role or "", str(node.state)) for node in nodes)
        family = GaugeMetricFamily("netboot_nodes", "Registered nodes, by role and state",
                                   labels=["role", "state"])
        for (role, state), count in sorted(counts.items()):
            family.add_metric([role, state], count)
        yield family
        drained = GaugeMetricFamily("netboot_nodes_drained", "Nodes drained (nothing is "
                                    "placed on them)", labels=["role"])
        for role, count in sorted(Counter(n.role or "" for n in nodes if n.drained).items()):
            drained.add_metric([role], count)
        yield drained
        ready = GaugeMetricFamily("netboot_node_ready", "1 while a node's agent heartbeats "
                                  "(state ready), 0 once it booted and is not ready",
                                  labels=["mac", "hostname", "role"])
        for node in nodes:
            if node.state != NodeState.PENDING:
                ready.add_metric([node.mac, node.hostname or "", node.role or ""],
                                 1 if node.state == NodeState.READY else 0)
        yield ready

    def _cloud(self) -> Iterator[Metric]:
        groups = self._registry.instance_counts()
        family = GaugeMetricFamily("netboot_instances", "Instances, by the state asked for "
                                   "and the state their dom0 reported",
                                   labels=["desired", "actual"])
        counts: Counter[tuple[str, str]] = Counter()
        by_node: Counter[str] = Counter()
        memory_of: Counter[str] = Counter()
        for desired, actual, node, count, memory in groups:
            counts[desired, actual] += count
            if node is not None:
                by_node[node] += count
                memory_of[node] += memory
        for (desired, actual), count in sorted(counts.items()):
            family.add_metric([desired, actual], count)
        yield family
        placed = GaugeMetricFamily("netboot_instances_placed", "Instances claimed by a dom0 "
                                   "(the guest map; node: the dom0's MAC)", labels=["node"])
        memory = GaugeMetricFamily("netboot_instances_memory_bytes", "Memory of the "
                                   "instances claimed by a dom0", labels=["node"])
        for node in sorted(by_node):
            placed.add_metric([node], by_node[node])
            memory.add_metric([node], memory_of[node])
        yield placed
        yield memory
        volumes = GaugeMetricFamily("netboot_volumes", "Volumes, by state and redundancy",
                                    labels=["state", "redundancy"])
        vcounts = Counter((str(v.state), str(v.redundancy)) for v in self._registry.volumes())
        for (state, redundancy), count in sorted(vcounts.items()):
            volumes.add_metric([state, redundancy], count)
        yield volumes


__all__ = ["DhcpCollector", "RegistryCollector", "TftpCollector"]
