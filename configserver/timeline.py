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


# How long before a machine's boot script its firmware's DHCP and TFTP may have happened.
PRE_SCRIPT_WINDOW = 120.0


def latest_boot(events: Sequence[BootEvent]) -> list[BootEvent]:
    """The events of the node's latest boot (all of them if it never began one).

    A boot starts at its boot script (one that boots an image), or where the node entered
    ``booting`` for another reason than its agent (a boot loader's DHCP), together with the
    firmware's DHCP and TFTP exchanges just before: an iPXE ROM's DHCP does not mark a boot by
    itself, but it belongs to it. A ready node's reboot moves its state only when the new
    agent takes the session over, long after the script: that transition is no start.
    """
    start = None
    for event in reversed(events):
        if _starts_boot(event):
            start = event.time
            break
    if start is None:
        return list(events)
    first = next(i for i, e in enumerate(events) if e.time >= start)
    while (first > 0 and events[first - 1].stage.startswith(("dhcp.", "tftp.", "http.ipxe"))
           and start - events[first - 1].time <= PRE_SCRIPT_WINDOW
           and not _os_dhcp(events[first - 1])):
        first -= 1
    # An operating system's offer or ack just before cannot begin a boot: drop it.
    while events[first].time < start and not _begins_boot(events[first]):
        first += 1
    return list(events[first:])


def _starts_boot(event: BootEvent) -> bool:
    if event.stage == "http.script":
        return event.detail.get("result") in ("linux", "xen")
    return (event.stage == "state" and event.detail.get("to") == "booting"
            and event.detail.get("reason") != "agent started")


def _os_dhcp(event: BootEvent) -> bool:
    return (event.stage in ("dhcp.discover", "dhcp.request")
            and event.detail.get("stage") == "none")


def _begins_boot(event: BootEvent) -> bool:
    if event.stage in ("dhcp.discover", "dhcp.request"):
        return event.detail.get("stage") not in (None, "none")
    return event.stage.startswith("tftp.") or event.stage == "http.ipxe"


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
