"""A node's boot timeline: when each stage of its latest boot happened (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from configserver.model import BootEvent

# Timeline stage -> event stages that mark it (the first one seen counts).
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dhcp", ("dhcp.discover", "dhcp.request", "dhcp.ack")),
    ("tftp", ("tftp.done", "tftp.start")),
    ("script", ("http.script",)),
    ("kernel", ("http.hypervisor", "http.kernel")),
    ("initramfs", ("http.initramfs",)),
    ("agent", ("agent.lookup",)),
    ("ready", ("agent.heartbeat",)),
)


def latest_boot(events: Sequence[BootEvent]) -> list[BootEvent]:
    """The events since the node last entered ``booting`` (all of them if it never did)."""
    start = None
    for event in reversed(events):
        if event.stage == "state" and event.detail.get("to") == "booting":
            start = event.time
            break
    if start is None:
        return list(events)
    return [e for e in events if e.time >= start]


def boot_timeline(events: Sequence[BootEvent]) -> list[dict[str, Any]]:
    """``[{stage, time, offset}]`` for each stage of the latest boot that has happened."""
    boot = latest_boot(events)
    found: list[dict[str, Any]] = []
    for name, markers in STAGES:
        hit = next((e for e in boot if e.stage in markers), None)
        if hit is not None:
            found.append({"stage": name, "time": hit.time, "event": hit.stage})
    if found:
        origin = min(item["time"] for item in found)
        for item in found:
            item["offset"] = round(item["time"] - origin, 3)
    return found
