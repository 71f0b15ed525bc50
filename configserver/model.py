"""Domain types of the registry: nodes, their NICs, roles and boot events.

All values are validated and normalised here, once, when they are written; readers on the hot
path (DHCP, TFTP, HTTP boot) trust what the registry hands them.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

import netbootmac
from configserver.errors import InvalidAddress, InvalidHostname, InvalidMac, InvalidRole

_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_ROLE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=-]{0,63}$")


def normalize_mac(text: str) -> str:
    """Return ``aa:bb:cc:dd:ee:ff`` for any common spelling of a NIC's MAC (``netbootmac``)."""
    try:
        return netbootmac.normalize_mac(text)
    except netbootmac.MacError as exc:
        raise InvalidMac(str(exc), hint=exc.hint) from None


def validate_hostname(text: str) -> str:
    """Return the hostname lower-cased if it is a valid RFC 1123 name, else raise."""
    if not isinstance(text, str):
        raise InvalidHostname("hostname must be a string")
    name = text.strip().lower().rstrip(".")
    if not name or len(name) > 253:
        raise InvalidHostname(f"invalid hostname {text!r}: 1 to 253 characters")
    for label in name.split("."):
        if not _HOST_LABEL.match(label):
            raise InvalidHostname(
                f"invalid hostname {text!r}",
                hint="labels of letters, digits and inner hyphens, at most 63 characters each")
    if name.replace(".", "").isdigit():
        raise InvalidHostname(f"invalid hostname {text!r}: all digits")
    return name


def validate_ipv4(text: str) -> str:
    """Return the canonical dotted quad of a unicast IPv4 host address, else raise."""
    try:
        addr = ipaddress.IPv4Address(str(text).strip())
    except ValueError:
        raise InvalidAddress(f"invalid IPv4 address {text!r}") from None
    if addr.is_multicast or addr.is_unspecified or str(addr) == "255.255.255.255":
        raise InvalidAddress(f"{text!r} cannot be reserved for a node")
    return str(addr)


def validate_role_name(text: str) -> str:
    if not isinstance(text, str) or not _ROLE_NAME.match(text):
        raise InvalidRole(f"invalid role name {text!r}",
                          hint="lower-case letter first, then letters, digits, '-' or '_'")
    return text


def validate_tag(text: str) -> str:
    if not isinstance(text, str) or not _TAG.match(text):
        raise InvalidRole(f"invalid tag {text!r}")
    return text


def validate_kernel_args(text: str) -> str:
    if not isinstance(text, str):
        raise InvalidRole("kernel arguments must be a string")
    if any(ch in text for ch in "\n\r\0") or len(text) > 2048:
        raise InvalidRole("kernel arguments must be one line of at most 2048 characters")
    return " ".join(text.split())


class NodeState(enum.StrEnum):
    REGISTERED = "registered"
    BOOTING = "booting"
    READY = "ready"
    LOST = "lost"
    PENDING = "pending"


class BootTemplate(enum.StrEnum):
    """How a role's image is started: a plain Linux kernel, or Xen with Linux as dom0."""

    LINUX = "linux"
    XEN = "xen"


@dataclass(frozen=True)
class Nic:
    mac: str
    ip: str | None = None


@dataclass(frozen=True)
class Role:
    name: str
    image: str
    template: BootTemplate = BootTemplate.LINUX
    kernel_args: str = ""
    hypervisor_args: str = ""
    description: str = ""
    builtin: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "image": self.image, "template": str(self.template),
                "kernel_args": self.kernel_args, "hypervisor_args": self.hypervisor_args,
                "description": self.description, "builtin": self.builtin}


BUILTIN_ROLES = (
    Role("dom0", image="dom0", template=BootTemplate.XEN,
         kernel_args="console=hvc0 earlyprintk=xen",
         hypervisor_args="dom0_mem=1024M,max:1024M dom0_max_vcpus=1 console=com1,vga "
                         "com1=115200,8n1 loglvl=all guest_loglvl=all",
         description="Xen hardware node (diskless PV dom0)", builtin=True),
    Role("storage", image="storage", template=BootTemplate.LINUX,
         kernel_args="console=tty0 console=ttyS0,115200",
         description="diskless storage node (iSCSI, AoE, NBD exports)", builtin=True),
)


@dataclass(frozen=True)
class NodeSpec:
    """What an operator declares about a node; the registry validates it on write."""

    mac: str
    role: str
    hostname: str | None = None
    ip: str | None = None
    kernel_args: str = ""
    tags: tuple[str, ...] = ()
    extra_nics: tuple[Nic, ...] = ()

    def normalized(self) -> NodeSpec:
        nics = tuple(Nic(normalize_mac(n.mac), validate_ipv4(n.ip) if n.ip else None)
                     for n in self.extra_nics)
        return NodeSpec(
            mac=normalize_mac(self.mac),
            role=validate_role_name(self.role),
            hostname=validate_hostname(self.hostname) if self.hostname else None,
            ip=validate_ipv4(self.ip) if self.ip else None,
            kernel_args=validate_kernel_args(self.kernel_args or ""),
            tags=tuple(sorted({validate_tag(t) for t in self.tags})),
            extra_nics=nics,
        )

    @property
    def nics(self) -> tuple[Nic, ...]:
        return (Nic(self.mac, self.ip), *self.extra_nics)


@dataclass(frozen=True)
class Node:
    mac: str
    role: str | None
    hostname: str | None
    nics: tuple[Nic, ...]
    kernel_args: str = ""
    tags: tuple[str, ...] = ()
    state: NodeState = NodeState.REGISTERED
    created: float = 0.0
    updated: float = 0.0
    last_seen: float | None = None
    last_heartbeat: float | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    drained: float | None = None  # when a drain was asked for (planned maintenance)

    @property
    def ip(self) -> str | None:
        return self.nics[0].ip if self.nics else None

    def ip_for(self, mac: str) -> str | None:
        for nic in self.nics:
            if nic.mac == mac:
                return nic.ip
        return None

    def spec(self) -> NodeSpec:
        return NodeSpec(mac=self.mac, role=self.role or "", hostname=self.hostname,
                        ip=self.ip, kernel_args=self.kernel_args, tags=self.tags,
                        extra_nics=self.nics[1:])

    def to_json(self) -> dict[str, Any]:
        return {
            "mac": self.mac, "role": self.role, "hostname": self.hostname, "ip": self.ip,
            "nics": [{"mac": n.mac, "ip": n.ip} for n in self.nics],
            "kernel_args": self.kernel_args, "tags": list(self.tags), "state": str(self.state),
            "created": self.created, "updated": self.updated, "last_seen": self.last_seen,
            "last_heartbeat": self.last_heartbeat, "facts": self.facts,
            "drained": self.drained is not None, "drained_since": self.drained,
        }


@dataclass(frozen=True)
class BootEvent:
    mac: str
    time: float
    stage: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"mac": self.mac, "time": self.time, "stage": self.stage, "detail": self.detail}


@dataclass(frozen=True)
class ApplyResult:
    created: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"created": list(self.created), "updated": list(self.updated),
                "unchanged": list(self.unchanged), "removed": list(self.removed),
                "roles": list(self.roles)}


class UnknownMacPolicy(enum.StrEnum):
    IGNORE = "ignore"
    DISCOVER = "discover"
