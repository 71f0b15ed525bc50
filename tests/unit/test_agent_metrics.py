"""A dom0 agent's per-guest metrics, from its latest reconcile report."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from nodeagent.metrics import guest_metrics

REPORT = [
    {"id": "i-1", "domain": "nb-web", "state": "running", "domid": 7, "cpu_seconds": 12.5,
     "memory_mib": 128, "net_rx_bytes": 1000, "net_tx_bytes": 2000, "disk_read_bytes": 4096,
     "disk_write_bytes": 8192, "error": None},
    {"id": "i-2", "domain": "nb-db", "state": "stopped", "domid": None, "cpu_seconds": None,
     "memory_mib": None, "error": "no array yet"},
    {"id": "i-3", "domain": "nb-new", "state": "running", "domid": 9, "cpu_seconds": 0.1,
     "memory_mib": 256, "error": None},  # its vif and vbd not read yet
]


class Report(Collector):
    def collect(self):
        yield from guest_metrics(REPORT)


def test_running_guests_get_their_counters_and_the_others_only_count():
    registry = CollectorRegistry()
    registry.register(Report())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode())
               for s in f.samples}
    web = (("domid", "7"), ("guest", "web"), ("guest_id", "i-1"))
    assert samples["netboot_guest_cpu_seconds_total", web] == 12.5
    assert samples["netboot_guest_memory_bytes", web] == 128 * 1024 * 1024
    assert samples["netboot_guest_network_receive_bytes_total", web] == 1000
    assert samples["netboot_guest_disk_write_bytes_total", web] == 8192
    new = (("domid", "9"), ("guest", "new"), ("guest_id", "i-3"))
    assert samples["netboot_guest_cpu_seconds_total", new] == 0.1
    assert ("netboot_guest_network_receive_bytes_total", new) not in samples
    assert not any(("guest", "db") in labels for _, labels in samples)
    assert samples["netboot_guests", (("state", "running"),)] == 2
    assert samples["netboot_guests", (("state", "stopped"),)] == 1
