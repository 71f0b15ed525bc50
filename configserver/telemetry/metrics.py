"""The config server's metrics: one ``ServerMetrics`` per application, in its own
``CollectorRegistry`` (never prometheus-client's process-wide default).

Two kinds live here. What happens in the HTTP side, the registry writer and the event loop is
observed as it happens (counters and histograms of prometheus-client, thread-safe). What the
DHCP and TFTP services and the registry already count or hold is read when scraped, by the
collectors of ``configserver.telemetry.collectors``: the protocol code keeps plain counters and
knows nothing of Prometheus.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Boot stages (configserver.timeline.STAGES) -> the name of the time spent from there to the
# next stage seen: the firmware's DHCP, its fetch of the boot loader, the boot script, the
# kernel (and hypervisor) download, the initramfs download and the kernel's start up to the
# agent's lookup, the agent's lookup up to its first heartbeat.
STAGE_SPANS = {"dhcp": "dhcp", "tftp": "firmware", "script": "script", "kernel": "kernel",
               "initramfs": "initramfs", "agent": "agent_ready"}
BOOT_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600, 1200)
REGISTRY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
LAG_PERIOD = 0.5  # seconds between two looks at the event loop
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """What ``GET /metrics`` shows; ``exposition()`` renders it (call it off the event loop:
    the collectors read the registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "netboot_http_requests", "HTTP requests answered, by route and status (the boot "
            "routes are /boot, /ipxe and /images)", ["route", "method", "status"], registry=r)
        self.boot_stage = Histogram(
            "netboot_boot_stage_seconds", "Seconds a node's boot spent in each stage, observed "
            "when the node became ready", ["stage"], buckets=BOOT_BUCKETS, registry=r)
        self.boot = Histogram(
            "netboot_boot_seconds", "Seconds from a node's first boot event to its agent's "
            "first heartbeat", buckets=BOOT_BUCKETS, registry=r)
        self.registry_latency = Histogram(
            "netboot_registry_operation_seconds", "Registry writes: a batch's commit, and a "
            "write as its caller waits for it", ["operation"], buckets=REGISTRY_BUCKETS,
            registry=r)
        self.loop_lag = Histogram(
            "netboot_event_loop_lag_seconds", f"How late the event loop wakes a timer (looked "
            f"at every {LAG_PERIOD} s)", buckets=LAG_BUCKETS, registry=r)
        self.loop_lag_last = Gauge("netboot_event_loop_lag_last_seconds",
                                   "The event loop's lag at the latest look", registry=r)

    def add(self, collector: Collector) -> None:
        self.registry.register(collector)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def registry_timing(self, operation: str, seconds: float) -> None:
        self.registry_latency.labels(operation).observe(seconds)

    def boot_finished(self, timeline: Sequence[dict[str, Any]]) -> None:
        """Observe one boot's stages (``configserver.timeline.boot_timeline`` of a node that
        just became ready)."""
        stages = sorted(timeline, key=lambda item: item["time"])
        if not stages or stages[-1]["stage"] != "ready":
            return
        for here, after in itertools.pairwise(stages):
            span = STAGE_SPANS.get(here["stage"])
            if span is not None:
                self.boot_stage.labels(span).observe(max(0.0, after["time"] - here["time"]))
        self.boot.observe(max(0.0, stages[-1]["time"] - stages[0]["time"]))

    async def watch_loop(self, period: float = LAG_PERIOD) -> None:
        """Forever: how much later than asked the loop runs a sleeping task."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(period)
            lag = max(0.0, loop.time() - start - period)
            self.loop_lag.observe(lag)
            self.loop_lag_last.set(lag)


__all__ = ["CONTENT_TYPE", "STAGE_SPANS", "ServerMetrics"]
