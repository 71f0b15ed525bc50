"""Disks from udev device records (properties plus sysfs attributes).

``disk_record`` is pure: it turns what udev knows about one block device into an inventory entry.
``read_block_devices`` is the only function here that touches pyudev.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

# Devices that are never a machine's disks.
IGNORED_PREFIXES = ("loop", "ram", "zram", "fd")
SYSFS_ATTRIBUTES = ("size", "queue/rotational", "removable", "ro", "device/model",
                    "device/vendor", "device/serial", "wwid", "device/wwid")


def _as_int(value: str | None) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    text = str(value).replace("_", " ").strip()
    return text or None


def disk_record(properties: Mapping[str, str], attributes: Mapping[str, str],
                by_id: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """One disk's inventory entry, or None for devices that are not disks."""
    devname = properties.get("DEVNAME", "")
    name = devname.rsplit("/", 1)[-1] or properties.get("DEVPATH", "").rsplit("/", 1)[-1]
    if not name or properties.get("DEVTYPE", "disk") != "disk":
        return None
    if name.startswith(IGNORED_PREFIXES):
        return None
    sectors = _as_int(attributes.get("size"))
    if not sectors:
        return None
    links = [link for link in properties.get("DEVLINKS", "").split()
             if link.startswith("/dev/disk/by-id/")]
    links.extend(link for link in by_id if link not in links)
    rotational = _as_int(attributes.get("queue/rotational"))
    wwn = (properties.get("ID_WWN_WITH_EXTENSION") or properties.get("ID_WWN")
           or _clean(attributes.get("wwid") or attributes.get("device/wwid")))
    return {
        "name": name,
        "path": devname or f"/dev/{name}",
        "size_bytes": sectors * 512,
        "model": _clean(properties.get("ID_MODEL") or attributes.get("device/model")),
        "vendor": _clean(properties.get("ID_VENDOR") or attributes.get("device/vendor")),
        "serial": _clean(properties.get("ID_SERIAL_SHORT") or properties.get("ID_SERIAL")
                         or attributes.get("device/serial")),
        "wwn": wwn,
        "rotational": None if rotational is None else bool(rotational),
        "removable": bool(_as_int(attributes.get("removable"))),
        "read_only": bool(_as_int(attributes.get("ro"))),
        "bus": properties.get("ID_BUS"),
        "by_id": sorted(links),
    }


def read_block_devices() -> list[tuple[dict[str, str], dict[str, str]]]:
    """(properties, attributes) of every whole block device, as pyudev reports them."""
    import pyudev

    records = []
    context = pyudev.Context()
    for device in context.list_devices(subsystem="block", DEVTYPE="disk"):
        properties = {str(k): str(v) for k, v in device.properties.items()}
        attributes: dict[str, str] = {}
        for name in SYSFS_ATTRIBUTES:
            try:
                attributes[name] = device.attributes.asstring(name)
            except (KeyError, UnicodeDecodeError, OSError):
                continue
        records.append((properties, attributes))
    return records
