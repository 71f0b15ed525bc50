"""Each dom0's guests in its work (``GET /api/v1/agent/work``), from the guest map (pure).

A dom0 is told only about the instances whose claim it holds, with the claim's epoch: what
it finds running named like an instance and not in this list it destroys (``nodeagent.roles
.guests``). An entry's ``desired`` is the instance's own; ``startable`` says whether the dom0
may create it now: once the dom0 reported its volume's array assembled there (attached,
degraded or resyncing) and its image's kernel is known. A guest that runs is never stopped
because it is not startable (a report that its array is briefly unusable, an image rebuilt).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from configserver.cloud.instances import Desired, Instance
from configserver.cloud.migration import RELEASED, SENDING
from configserver.cloud.model import MIB, Volume

BRIDGE = "xenbr0"
USABLE = ("attached", "degraded", "resyncing")  # the array runs on the dom0


@dataclass(frozen=True)
class GuestBoot:
    """Where a dom0 fetches an image's kernel and initramfs, and their sha256."""

    kernel: str
    kernel_sha256: str | None
    ramdisk: str
    ramdisk_sha256: str | None
    cmdline: str


@dataclass(frozen=True)
class Peer:
    """A dom0 as another dom0 reaches it in a migration: its certificate's identity (its
    current boot), the address its heartbeat came from and its agent's API port."""

    identity: str | None
    address: str | None
    api_port: int | None = None


def guest_work(instances: Sequence[Instance], mac: str, *, volumes: Mapping[str, Volume],
               boots: Mapping[str, GuestBoot], server_url: str,
               peers: Mapping[str, Peer] | None = None) -> list[dict[str, Any]]:
    """The work entries of the instances that dom0 ``mac`` holds the claim of. One that is
    moving away carries ``migrate`` (where to send it) once the target listens, and is left
    out once the source released it (it runs on the target now, paused or not)."""
    entries = []
    for instance in sorted(instances, key=lambda i: i.name):
        if instance.claim is None or instance.claim.node != mac or instance.failover:
            continue  # not this dom0's, or fenced from it: its domain here is destroyed
        moving = instance.migration
        if moving is not None and moving.phase == RELEASED:
            continue
        entry = _entry(instance, mac, instance.claim.epoch, volumes=volumes, boots=boots,
                       server_url=server_url)
        if moving is not None and moving.phase == SENDING:
            peer = (peers or {}).get(moving.target) or Peer(None, None)
            entry["migrate"] = {"id": moving.id, "address": peer.address, "port": moving.port,
                                "peer": peer.identity, "api_port": peer.api_port}
        entries.append(entry)
    return entries


def incoming_work(instances: Sequence[Instance], mac: str, *, volumes: Mapping[str, Volume],
                  boots: Mapping[str, GuestBoot], server_url: str,
                  peers: Mapping[str, Peer]) -> list[dict[str, Any]]:
    """The instances on their way to dom0 ``mac``: what it prepares (the volume's size, the
    source's identity to let in) and, once the source released the array, ``released``."""
    entries = []
    for instance in sorted(instances, key=lambda i: i.name):
        moving = instance.migration
        if moving is None or moving.target != mac:
            continue
        entry = _entry(instance, mac, moving.epoch, volumes=volumes, boots=boots,
                       server_url=server_url)
        volume = volumes.get(instance.volume or "")
        source = peers.get(moving.source) or Peer(None, None)
        entry["migration"] = {"id": moving.id, "peer": source.identity,
                              "size": volume.size if volume else None,
                              "released": moving.phase == RELEASED}
        entries.append(entry)
    return entries


def _entry(instance: Instance, mac: str, epoch: int, *, volumes: Mapping[str, Volume],
           boots: Mapping[str, GuestBoot], server_url: str) -> dict[str, Any]:
    volume = volumes.get(instance.volume or "")
    boot = boots.get(instance.image or "")
    where = volume.attachment(mac) if volume is not None else None
    attached = where is not None and where.state in USABLE and not where.detaching
    cmdline = " ".join(filter(None, (
        boot.cmdline if boot else "", f"netboot.server={server_url}",
        f"netboot.mac={instance.nics[0].mac}" if instance.nics else "",
        # Its name, set before the network is up (DHCP's option 12 names it too, but
        # networkd may not set it: without polkit, hostnamed refuses networkd).
        f"netboot.hostname={instance.name}")))
    return {
        "id": instance.id, "name": instance.name, "domain": instance.domain,
        "uuid": instance.uuid, "epoch": epoch,
        "desired": "running" if instance.desired == Desired.RUNNING else "stopped",
        "startable": attached and boot is not None,
        "hard": instance.desired == Desired.DESTROYED, "reboots": instance.reboots,
        "memory_mib": instance.memory // MIB, "vcpus": instance.vcpus,
        "max_memory_mib": instance.resources.max_memory // MIB,
        "cpu_weight": instance.resources.cpu_weight,
        "cpu_cap": instance.resources.cpu_cap, "net_rate": instance.resources.net_rate,
        "volume": instance.volume,
        "device": f"/dev/md/{volume.lv}" if volume is not None else None,
        "kernel": {"url": boot.kernel, "sha256": boot.kernel_sha256} if boot else None,
        "ramdisk": {"url": boot.ramdisk, "sha256": boot.ramdisk_sha256} if boot else None,
        "cmdline": cmdline,
        "nics": [{"mac": n.mac, "ip": n.ip, "bridge": BRIDGE} for n in instance.nics],
    }


def guest_network(servers: Iterable[str | None], *, dhcp_port: int, http_port: int,
                  node_ips: Iterable[str | None], networks: Iterable[str],
                  instance_pools: Iterable[tuple[str, str] | None]) -> dict[str, Any]:
    """What a dom0's guests may reach (``nodeagent.roles.guestnet``): of the config server's
    addresses only DHCP and the plain-HTTP port; of the boot networks (``networks``: the
    DHCP subnets) nothing of their own but the instance pools (each other); of the nodes'
    addresses, wherever they are, nothing. Default-deny on the boot network: the nodes, the
    dynamic pool, the router and any box not registered are all protected."""
    def ipv4(value: str | None) -> str | None:
        try:
            return str(ipaddress.IPv4Address(value)) if value else None
        except ValueError:
            return None

    protected = [ipaddress.IPv4Network(n, strict=False) for n in networks]
    for pool in instance_pools:
        if pool is None:
            continue
        first, last = (ipaddress.IPv4Address(a) for a in pool)
        for hole in ipaddress.summarize_address_range(first, last):
            protected = [piece for net in protected for piece in (
                net.address_exclude(hole) if hole.subnet_of(net) else
                () if net.subnet_of(hole) else (net,))]
    protected += [ipaddress.IPv4Network(f"{ip}/32") for ip in map(ipv4, node_ips) if ip]
    return {"servers": sorted({ip for ip in map(ipv4, servers) if ip}),
            "dhcp_port": dhcp_port, "http_port": http_port,
            "protected": [str(n) for n in ipaddress.collapse_addresses(protected)]}


__all__ = ["BRIDGE", "GuestBoot", "Peer", "guest_network", "guest_work", "incoming_work"]
