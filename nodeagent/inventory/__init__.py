"""The machine's inventory: gathered raw (I/O), assembled pure.

``gather`` reads procfs, sysfs, udev (pyudev) and rtnetlink (pyroute2) into ``RawFacts``;
``assemble`` turns ``RawFacts`` into the JSON document the agent pushes, and is what the unit tests
drive with recorded data. One failing source never spoils the rest: its section carries an
``error`` instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeagent.inventory import disks, nics, platform, procfs

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass
class RawFacts:
    """What the machine said, before any interpretation."""

    hostname: str | None = None
    cpuinfo: str | None = None
    meminfo: str | None = None
    block_devices: list[tuple[dict[str, str], dict[str, str]]] = field(default_factory=list)
    by_id_links: dict[str, tuple[str, ...]] = field(default_factory=dict)
    links: list[Any] = field(default_factory=list)
    addresses: list[Any] = field(default_factory=list)
    nic_sysfs: dict[str, dict[str, Any]] = field(default_factory=dict)
    dmi: dict[str, str | None] = field(default_factory=dict)
    boot_mode: str | None = None
    uname: tuple[str, str, str] = ("", "", "")
    cmdline: str | None = None
    xen: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def assemble(raw: RawFacts) -> dict[str, Any]:
    """The inventory document for ``raw`` (pure)."""
    disk_entries = []
    for properties, attributes in raw.block_devices:
        name = properties.get("DEVNAME", "").rsplit("/", 1)[-1]
        record = disks.disk_record(properties, attributes, raw.by_id_links.get(name, ()))
        if record is not None:
            disk_entries.append(record)
    inventory: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "hostname": raw.hostname,
        "cpu": procfs.parse_cpuinfo(raw.cpuinfo) if raw.cpuinfo else None,
        "memory": procfs.parse_meminfo(raw.meminfo) if raw.meminfo else None,
        "disks": sorted(disk_entries, key=lambda d: d["name"]),
        "nics": nics.nic_inventory(raw.links, raw.addresses, raw.nic_sysfs),
        "dmi": raw.dmi,
        "boot_mode": raw.boot_mode,
        "kernel": platform.kernel(*raw.uname, raw.cmdline),
        "xen": raw.xen,
    }
    if raw.errors:
        inventory["errors"] = dict(sorted(raw.errors.items()))
    return inventory


def _guard(raw: RawFacts, section: str, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception as exc:
        log.warning("inventory: cannot read %s: %s", section, exc)
        raw.errors[section] = f"{type(exc).__name__}: {exc}"
        return None


def gather(root: Path = Path("/")) -> RawFacts:
    """Read every source of the running machine (``root`` for the file-based ones)."""
    raw = RawFacts()
    raw.hostname = _guard(raw, "hostname", socket.gethostname)
    raw.cpuinfo = platform.read_text(root / "proc/cpuinfo")
    raw.meminfo = platform.read_text(root / "proc/meminfo")
    raw.block_devices = _guard(raw, "disks", disks.read_block_devices) or []
    raw.by_id_links = _guard(raw, "disks.by_id", lambda: _by_id_links(root)) or {}
    links_addrs = _guard(raw, "nics", nics.read_netlink) or ([], [])
    raw.links, raw.addresses = links_addrs
    raw.nic_sysfs = _guard(raw, "nics.sysfs", lambda: _nic_sysfs(root, raw.links)) or {}
    raw.dmi = _guard(raw, "dmi", lambda: platform.dmi(root)) or {}
    raw.boot_mode = _guard(raw, "boot_mode", lambda: platform.boot_mode(root))
    uname = os.uname()
    raw.uname = (uname.release, uname.version, uname.machine)
    raw.cmdline = platform.read_text(root / "proc/cmdline")
    raw.xen = _guard(raw, "xen", lambda: platform.xen(root)) or {}
    return raw


def collect(root: Path = Path("/")) -> dict[str, Any]:
    """Gather and assemble the running machine's inventory."""
    return assemble(gather(root))


def _by_id_links(root: Path) -> dict[str, tuple[str, ...]]:
    """``/dev/disk/by-id`` links per device name (for machines without a udev database)."""
    base = root / "dev/disk/by-id"
    out: dict[str, list[str]] = {}
    if not base.is_dir():
        return {}
    for link in sorted(base.iterdir()):
        try:
            target = os.path.basename(os.path.realpath(link))
        except OSError:
            continue
        out.setdefault(target, []).append(f"/dev/disk/by-id/{link.name}")
    return {name: tuple(links) for name, links in out.items()}


def _nic_sysfs(root: Path, links: list[Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for message in links:
        name = nics.link_record(message)["name"]
        if not name or "/" in name:
            continue
        base = root / "sys/class/net" / name
        entry: dict[str, Any] = {}
        with contextlib.suppress(OSError):
            entry["driver"] = os.path.basename(os.readlink(base / "device/driver"))
        speed = platform.read_text(base / "speed")
        try:
            entry["speed"] = int(speed.strip()) if speed else None
        except ValueError:
            entry["speed"] = None
        out[name] = entry
    return out
