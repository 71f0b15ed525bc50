"""Instances (Xen guests) and the central guest map: desired state, claims and NICs (pure).

An instance runs on at most one dom0: the one holding its claim ``(node, epoch)``. The claim
moves only here, through the config server's registry, one write at a time: ``claim`` gives
it to a dom0 (a new epoch each time it changes hands), ``release`` takes it back once the
holder reported the domain gone. A dom0 agent confirms its claim (node and epoch) just
before ``xl create`` and destroys any domain named like an instance that its node does not
hold the claim of, so two dom0s can never both run one instance.

No I/O, no registry, no HTTP: dataclasses, validation and the transitions of the map.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import secrets
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any

from configserver.cloud.failover import Failover
from configserver.cloud.migration import Migration
from configserver.cloud.model import MIB
from configserver.cloud.resources import Resources
from configserver.errors import ClaimHeld, Conflict, InvalidRequest, InvalidSize, InvalidVolumeName

XEN_OUI = "00:16:3e"
DOMAIN_PREFIX = "nb-"
MIN_MEMORY = 64 * MIB
MAX_MEMORY = 1 << 40
MAX_VCPUS = 128
# Names become a domain name (nb-<name>), a hostname label and a volume name (<name>-disk).
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_UUID_NAMESPACE = uuid.UUID("6f1c2a5e-8d3b-4f0a-9c7e-2b4d6a8e0f13")


class Desired(enum.StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    DESTROYED = "destroyed"  # stopped hard, then forgotten once its dom0 reports it gone


@dataclass(frozen=True)
class Claim:
    """The one dom0 that may run the instance, and the epoch of that grant."""

    node: str
    epoch: int


@dataclass(frozen=True)
class InstanceNic:
    mac: str
    ip: str | None


@dataclass(frozen=True)
class Instance:
    id: str
    name: str
    memory: int
    vcpus: int
    volume: str | None
    desired: Desired = Desired.STOPPED
    claim: Claim | None = None
    epoch: int = 0  # the last epoch handed out: a new claim always gets a higher one
    nics: tuple[InstanceNic, ...] = ()
    tenant: str | None = None
    image: str | None = None
    ssh_keys: tuple[str, ...] = ()
    actual: str = "stopped"  # what the claim holder last reported
    created: float = 0.0
    updated: float = 0.0
    usage: dict[str, float] = field(default_factory=dict)
    reboots: int = 0  # each reboot request counts one up; the dom0 reboots a guest behind it
    delete_disk: bool = False  # destroying it deletes its volume too
    desired_generation: int = 0  # the cloud generation of the last change of ``desired``
    # Scheduler weight and cap, vif rate, memory ceiling.
    resources: Resources = field(default_factory=Resources)
    migration: Migration | None = None  # a live migration in progress
    failover: Failover | None = None  # its dom0 is lost: fencing, then a restart elsewhere

    @property
    def domain(self) -> str:
        return domain_name(self.name)

    @property
    def uuid(self) -> str:
        return domain_uuid(self.id)


def new_instance_id() -> str:
    return secrets.token_hex(8)


def validate_instance_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidVolumeName(f"invalid instance name {name!r}",
                                hint="1 to 40 lowercase letters, digits and '-', "
                                     "starting with a letter or digit")
    return name


def validate_memory(size: int) -> int:
    """``size`` (bytes, whole MiB) if a guest can run in it; InvalidSize otherwise."""
    if size < MIN_MEMORY:
        raise InvalidSize(f"an instance needs at least 64 MiB of memory, not {size // MIB} MiB",
                          hint="e.g. --memory 256M")
    if size > MAX_MEMORY:
        raise InvalidSize("an instance's memory is at most 1 TiB", hint="e.g. --memory 256M")
    return size


def validate_vcpus(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VCPUS:
        raise InvalidRequest(f"vcpus must be a whole number from 1 to {MAX_VCPUS}, "
                             f"not {value!r}")
    return value


def domain_name(name: str) -> str:
    """The Xen domain name of instance ``name`` (what ``xl list`` shows)."""
    return f"{DOMAIN_PREFIX}{name}"


def domain_uuid(instance_id: str) -> str:
    """The domain's UUID: derived from the instance, so the same on every dom0 and boot."""
    return str(uuid.uuid5(_UUID_NAMESPACE, instance_id))


def new_mac(used: Collection[str], token: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """A MAC in Xen's range 00:16:3e that no NIC in ``used`` has (lowercase)."""
    for _ in range(1000):
        tail = token(3)
        mac = XEN_OUI + "".join(f":{b:02x}" for b in tail)
        if mac not in used:
            return mac
    raise InvalidRequest("no free MAC address in 00:16:3e (a thousand tries)")


def pick_ip(pool: tuple[str, str] | None, used: Collection[str],
            wanted: str | None = None) -> str:
    """``wanted`` if it is free (and in ``pool``, when there is one), else the pool's lowest
    free address."""
    if wanted is not None:
        try:
            value = int(ipaddress.IPv4Address(wanted))
        except ValueError:
            raise InvalidRequest(f"not an IPv4 address: {wanted!r}") from None
        if pool is not None and not (int(ipaddress.IPv4Address(pool[0])) <= value
                                     <= int(ipaddress.IPv4Address(pool[1]))):
            raise InvalidRequest(f"{wanted} is outside the instance pool {pool[0]}-{pool[1]}")
        if wanted in used:
            raise InvalidRequest(f"{wanted} is taken (an instance's or a registered node's "
                                 "address)")
        return str(ipaddress.IPv4Address(value))
    if pool is None:
        raise InvalidRequest("this server has no instance pool to take an address from",
                             hint="give the instance an address (--ip), or start the server "
                                  "with --instance-pool START-END ([cloud] instance_pool)")
    first, last = (int(ipaddress.IPv4Address(a)) for a in pool)
    taken = set(used)
    for value in range(first, last + 1):
        candidate = str(ipaddress.IPv4Address(value))
        if candidate not in taken:
            return candidate
    raise InvalidRequest(f"the instance pool {pool[0]}-{pool[1]} is full",
                         hint="destroy instances you no longer need, or widen --instance-pool")


# -- the guest map ---------------------------------------------------------------------------

def claim(instance: Instance, node: str) -> Instance:
    """``instance`` wanted running on ``node``: the claim given to ``node`` (a new epoch), or
    kept if ``node`` holds it already. ClaimHeld if another dom0 holds it."""
    if instance.desired == Desired.DESTROYED:
        raise Conflict(f"instance {instance.name} is being destroyed",
                       hint="create a new one once it is gone")
    if instance.claim is not None:
        if instance.claim.node != node:
            raise ClaimHeld(f"instance {instance.name} is held by {instance.claim.node} "
                            f"(epoch {instance.claim.epoch})",
                            hint="stop it first, or migrate it")
        return replace(instance, desired=Desired.RUNNING)
    epoch = instance.epoch + 1
    return replace(instance, desired=Desired.RUNNING, claim=Claim(node, epoch), epoch=epoch)


def release(instance: Instance, node: str, epoch: int) -> Instance:
    """The claim taken back after ``node`` reported the domain of ``epoch`` gone; unchanged
    if that is not the current claim (a late or repeated report)."""
    if instance.claim != Claim(node, epoch) or instance.desired == Desired.RUNNING:
        return instance
    return replace(instance, claim=None, actual="stopped")


def holds(instance: Instance, node: str, epoch: int) -> bool:
    """Whether ``node`` may run ``instance`` under ``epoch`` now."""
    return (instance.claim == Claim(node, epoch) and instance.desired == Desired.RUNNING
            and instance.failover is None)


def to_json(instance: Instance) -> dict[str, Any]:
    return {
        "id": instance.id, "name": instance.name, "memory": instance.memory,
        "vcpus": instance.vcpus, "volume": instance.volume, "image": instance.image,
        "tenant": instance.tenant, "desired": str(instance.desired), "actual": instance.actual,
        "node": instance.claim.node if instance.claim else None,
        "epoch": instance.claim.epoch if instance.claim else None,
        "domain": instance.domain, "uuid": instance.uuid,
        "nics": [{"mac": n.mac, "ip": n.ip} for n in instance.nics],
        "created": instance.created, "updated": instance.updated, "usage": instance.usage,
        "reboots": instance.reboots, "ssh_keys": len(instance.ssh_keys),
        "resources": instance.resources.to_json(),
        "migration": instance.migration.to_json() if instance.migration else None,
        "failover": instance.failover.to_json() if instance.failover else None,
    }


__all__ = ["DOMAIN_PREFIX", "XEN_OUI", "Claim", "Desired", "Instance", "InstanceNic", "claim",
           "domain_name", "domain_uuid", "holds", "new_instance_id", "new_mac", "pick_ip",
           "release", "to_json", "validate_instance_name", "validate_memory", "validate_vcpus"]
