"""Replicated volumes: what the control plane wants (desired state) and what agents report.

Pure: dataclasses, validation, size parsing and the names derived from a volume's id (LV,
iSCSI target, md array, CHAP credentials). No I/O, no registry, no HTTP.

A volume is two legs (logical volumes of the same size on two distinct storage nodes, each
exported as an iSCSI target) that a dom0 assembles into one md RAID1 array.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

from configserver.errors import InvalidSize, InvalidVolumeName

MIB = 1024 * 1024
LEG_OVERHEAD = 4 * MIB  # md metadata at the end of each leg
VG_NAME = "netboot"
IQN_PREFIX = "iqn.2026-12.net.netboot"
ISCSI_PORT = 3260
MAX_SIZE = 1 << 50  # 1 PiB: a typo, not a volume

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_ID = re.compile(r"^[0-9a-f]{16}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


class VolumeState(enum.StrEnum):
    CREATING = "creating"
    READY = "ready"
    DELETING = "deleting"
    ERROR = "error"


class Redundancy(enum.StrEnum):
    UNKNOWN = "unknown"
    REDUNDANT = "redundant"
    DEGRADED = "degraded"
    RESYNCING = "resyncing"


# States of a volume whose legs the storage nodes keep exported.
EXPORTED_STATES = frozenset({VolumeState.CREATING, VolumeState.READY, VolumeState.ERROR})


@dataclass(frozen=True)
class Leg:
    """One half of a volume: an LV on storage node ``node`` (its primary MAC)."""

    node: str
    state: str = "pending"  # the storage report: pending, creating, exported, error, removed
    error: str | None = None
    member: str | None = None  # the dom0 report: active, faulty, missing, rebuilding


@dataclass(frozen=True)
class Attachment:
    """A dom0 the volume is attached to (and so whose initiator the targets let in)."""

    node: str
    # requested (nothing reported yet), then what the dom0 reports: attaching, attached,
    # degraded, resyncing, error; detaching once a detach is asked for.
    state: str = "requested"
    device: str | None = None
    sync: dict[str, Any] | None = None
    error: str | None = None
    detaching: bool = False


@dataclass(frozen=True)
class Volume:
    id: str
    name: str
    size: int
    image: str | None = None
    tenant: str | None = None
    state: VolumeState = VolumeState.CREATING
    error: str | None = None
    initialized: bool = False
    redundancy: Redundancy = Redundancy.UNKNOWN
    created: float = 0.0
    updated: float = 0.0
    legs: tuple[Leg, ...] = ()
    attachments: tuple[Attachment, ...] = field(default=())

    @property
    def lv(self) -> str:
        return lv_name(self.id)

    @property
    def target(self) -> str:
        return target_iqn(self.id)

    @property
    def leg_size(self) -> int:
        return self.size + LEG_OVERHEAD

    def leg(self, mac: str) -> Leg | None:
        return next((g for g in self.legs if g.node == mac), None)

    def attachment(self, mac: str) -> Attachment | None:
        return next((a for a in self.attachments if a.node == mac), None)

    def with_leg(self, leg: Leg) -> Volume:
        return replace(self, legs=tuple(leg if g.node == leg.node else g for g in self.legs))

    def with_attachment(self, attachment: Attachment | None, mac: str) -> Volume:
        """This volume with ``mac``'s attachment replaced (None: removed)."""
        kept = [a for a in self.attachments if a.node != mac]
        if attachment is not None:
            kept.append(attachment)
        return replace(self, attachments=tuple(sorted(kept, key=lambda a: a.node)))


@dataclass(frozen=True)
class VolumeEvent:
    volume: str
    time: float
    stage: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "stage": self.stage, "detail": self.detail}


def new_volume_id() -> str:
    return secrets.token_hex(8)


def validate_volume_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidVolumeName(f"invalid volume name {name!r}",
                                hint="1 to 63 lowercase letters, digits and '-', "
                                     "starting with a letter or digit")
    return name


def validate_volume_id(text: object) -> str:
    if not isinstance(text, str) or not _ID.match(text):
        raise InvalidVolumeName(f"invalid volume id {text!r}")
    return text


def parse_size(value: object) -> int:
    """Bytes from ``2G``, ``512M``, ``1T``, ``1.5G``, ``4096`` or an int (binary units),
    rounded up to a whole MiB; InvalidSize unless > 0 and at most 1 PiB."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        amount, unit = match.groups()
        whole, _, fraction = amount.partition(".")
        scale = _UNITS[unit.lower()]
        number = int(whole) * scale + (int(fraction) * scale + 10 ** len(fraction) - 1
                                       ) // 10 ** len(fraction) if fraction else int(whole) * scale
    else:
        raise InvalidSize(f"not a size: {value!r}", hint="e.g. 2G, 512M, 1T or a byte count")
    if number <= 0:
        raise InvalidSize(f"a volume needs a size above zero, not {value!r}",
                          hint="e.g. --size 2G")
    if number > MAX_SIZE:
        raise InvalidSize(f"{value!r} is larger than 1 PiB", hint="e.g. --size 2G")
    return -(-number // MIB) * MIB


def format_size(size: int) -> str:
    """``2 GiB``, ``3.9 GiB``, ``512 MiB``: binary units, one decimal unless whole."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            amount = size / scale
            text = f"{amount:.0f}" if size % scale == 0 else f"{amount:.1f}"
            return f"{text} {unit}"
    return f"{size} B"


def lv_name(volume_id: str) -> str:
    return f"nb-{volume_id}"


def target_iqn(volume_id: str) -> str:
    return f"{IQN_PREFIX}:vol-{volume_id}"


def _hex(mac: str) -> str:
    return mac.replace(":", "").lower()


def initiator_iqn(mac: str) -> str:
    """The iSCSI initiator name of dom0 ``mac``."""
    return f"{IQN_PREFIX}:node-{_hex(mac)}"


def chap_user(mac: str) -> str:
    return f"node-{_hex(mac)}"


def chap_secret(key: bytes, volume_id: str, mac: str) -> str:
    """The CHAP secret of dom0 ``mac`` for one volume: derived from the server's key, so
    nothing secret is stored and a restart gives the same value."""
    digest = hmac.new(key, f"chap|{volume_id}|{mac}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode()[:24]


__all__ = ["EXPORTED_STATES", "LEG_OVERHEAD", "MIB", "VG_NAME", "Attachment", "Leg",
           "Redundancy", "Volume", "VolumeEvent", "VolumeState", "chap_secret", "chap_user",
           "format_size", "initiator_iqn", "lv_name", "new_volume_id", "parse_size",
           "target_iqn", "validate_volume_name"]
