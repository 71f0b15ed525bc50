"""NICs from rtnetlink link and address messages (pyroute2), plus driver and speed from sysfs.

The record functions accept pyroute2 messages or their recorded form
(``{"index": 2, "attrs": [["IFLA_IFNAME", "eth0"], ...]}``), so assembly is testable from
captures. ``read_netlink`` is the only function here that opens a netlink socket.
"""

from __future__ import annotations

import socket
from typing import Any

ARPHRD_LOOPBACK = 772
IFF_UP = 0x1
IFF_LOOPBACK = 0x8


def attrs(message: Any) -> dict[str, Any]:
    """The netlink attributes of a message as a dict (first occurrence wins)."""
    out: dict[str, Any] = {}
    for slot in message.get("attrs", ()) or ():
        key, value = slot[0], slot[1]
        out.setdefault(key, value)
    return out


def link_record(message: Any) -> dict[str, Any]:
    """The interesting fields of one RTM_NEWLINK message."""
    values = attrs(message)
    linkinfo = values.get("IFLA_LINKINFO")
    kind = attrs(linkinfo).get("IFLA_INFO_KIND") if linkinfo else None
    flags = int(message.get("flags", 0) or 0)
    return {
        "index": message.get("index"),
        "name": values.get("IFLA_IFNAME"),
        "mac": values.get("IFLA_ADDRESS"),
        "mtu": values.get("IFLA_MTU"),
        "operstate": str(values.get("IFLA_OPERSTATE", "UNKNOWN")).lower(),
        "carrier": values.get("IFLA_CARRIER"),
        "admin_up": bool(flags & IFF_UP),
        "loopback": bool(flags & IFF_LOOPBACK)
        or message.get("ifi_type") == ARPHRD_LOOPBACK,
        "kind": kind,
    }


def address_record(message: Any) -> dict[str, Any]:
    values = attrs(message)
    family = message.get("family")
    address = values.get("IFA_LOCAL") or values.get("IFA_ADDRESS")
    return {
        "index": message.get("index"),
        "family": "inet" if family == socket.AF_INET else "inet6",
        "address": address,
        "prefixlen": message.get("prefixlen"),
        "scope": {0: "global", 253: "link", 254: "host"}.get(message.get("scope"),
                                                            message.get("scope")),
    }


def nic_inventory(links: list[Any], addresses: list[Any],
                  sysfs: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Inventory entries for every non-loopback link, sorted by name."""
    sysfs = sysfs or {}
    by_index: dict[Any, list[dict[str, Any]]] = {}
    for message in addresses:
        record = address_record(message)
        if record["address"]:
            by_index.setdefault(record["index"], []).append(
                {k: record[k] for k in ("family", "address", "prefixlen", "scope")})
    nics = []
    for message in links:
        link = link_record(message)
        if link["loopback"] or not link["name"]:
            continue
        extra = sysfs.get(link["name"], {})
        speed = extra.get("speed")
        up = link["operstate"] == "up" or (link["operstate"] == "unknown"
                                           and link["admin_up"] and link["carrier"] == 1)
        nics.append({
            "name": link["name"],
            "mac": link["mac"],
            "driver": extra.get("driver") or link["kind"],
            "kind": link["kind"],
            "speed_mbps": speed if isinstance(speed, int) and speed > 0 else None,
            "link": "up" if up else "down",
            "operstate": link["operstate"],
            "mtu": link["mtu"],
            "addresses": sorted(by_index.get(link["index"], []),
                                key=lambda a: (a["family"], str(a["address"]))),
        })
    return sorted(nics, key=lambda n: n["name"])


def read_netlink() -> tuple[list[Any], list[Any]]:
    """All links and addresses of the current network namespace, through pyroute2."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return list(ipr.get_links()), list(ipr.get_addr())
