"""Each node's desired work (``GET /api/v1/agent/work``), computed from the volumes (pure).

A storage node exports the legs it holds of every live volume, letting in the dom0s the
volume is attached to (or still detaching from: the map is updated last, so a target's ACL
drops a dom0 only after that dom0 reported the array stopped), and removes the legs of
deleted volumes. A dom0 assembles the arrays of the volumes attached to it once their legs
can be reached: both exported, or one if the array exists already (a degraded volume).

A drained storage node (planned maintenance, ``drain.py``) exports a leg only while a dom0
still holds it; the dom0s see its legs flagged ``leaving`` and let go of them first.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from configserver.cloud.drain import holds
from configserver.cloud.model import (
    EXPORTED_STATES,
    ISCSI_PORT,
    VG_NAME,
    Volume,
    VolumeState,
    chap_secret,
    chap_user,
    initiator_iqn,
)


@dataclass(frozen=True)
class ImageSource:
    """Where a storage agent fetches an image's root file system to fill a new leg."""

    name: str
    url: str | None
    size: int | None
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "size": self.size, "sha256": self.sha256}


def portal(ip: str | None) -> str | None:
    return f"{ip}:{ISCSI_PORT}" if ip else None


def storage_work(volumes: Sequence[Volume], mac: str, *, key: bytes,
                 images: Mapping[str, ImageSource], drained: bool = False) -> dict[str, Any]:
    exports, remove = [], []
    for volume in sorted(volumes, key=lambda v: v.id):
        leg = volume.leg(mac)
        if leg is None:
            continue
        if volume.state == VolumeState.DELETING:
            if leg.state != "removed":
                remove.append({"volume": volume.id, "lv": volume.lv, "target": volume.target})
            continue
        if volume.state not in EXPORTED_STATES or (drained and not holds(volume, leg)):
            continue
        image = None
        if volume.image is not None:
            image = images.get(volume.image, ImageSource(volume.image, None, None)).to_json()
        exports.append({
            "volume": volume.id, "name": volume.name, "lv": volume.lv,
            "size": volume.leg_size, "volume_size": volume.size, "target": volume.target,
            "image": image,
            "initiators": [{"node": a.node, "iqn": initiator_iqn(a.node),
                            "user": chap_user(a.node),
                            "secret": chap_secret(key, volume.id, a.node)}
                           for a in volume.attachments],
        })
    return {"vg": VG_NAME, "exports": exports, "remove": remove, "drained": drained}


def reachable(volume: Volume) -> bool:
    """Whether a dom0 may assemble the volume's array now."""
    exported = sum(leg.state == "exported" for leg in volume.legs)
    return exported == len(volume.legs) or (volume.initialized and exported >= 1)


def dom0_work(volumes: Sequence[Volume], mac: str, *, key: bytes,
              portals: Mapping[str, str | None],
              drained: Collection[str] = frozenset(),
              standby: Collection[str] = frozenset()) -> dict[str, Any]:
    """``standby``: ids of volumes this dom0 logs in to but does not assemble yet (the disk
    of an instance migrating here, until its source released the array)."""
    attachments = []
    for volume in sorted(volumes, key=lambda v: v.id):
        attachment = volume.attachment(mac)
        if (attachment is None or attachment.detaching
                or volume.state not in EXPORTED_STATES or not reachable(volume)):
            continue
        attachments.append({
            "volume": volume.id, "name": volume.name, "size": volume.size,
            "md_name": volume.lv, "device": f"/dev/md/{volume.lv}",
            "create": not volume.initialized and volume.id not in standby,
            "standby": volume.id in standby, "user": chap_user(mac),
            "secret": chap_secret(key, volume.id, mac),
            "legs": [{"node": leg.node, "portal": portals.get(leg.node),
                      "target": volume.target, "lun": 0, "leaving": leg.node in drained}
                     for leg in volume.legs],
        })
    return {"initiator": initiator_iqn(mac), "attachments": attachments}


def node_work(generation: int, role: str | None, mac: str, volumes: Sequence[Volume], *,
              key: bytes, images: Mapping[str, ImageSource],
              portals: Mapping[str, str | None],
              drained: Collection[str] = frozenset(),
              standby: Collection[str] = frozenset()) -> dict[str, Any]:
    """The whole answer of ``GET /api/v1/agent/work`` for node ``mac`` of role ``role``;
    ``drained`` names the drained nodes."""
    work: dict[str, Any] = {"generation": generation, "role": role}
    if role == "storage":
        work["storage"] = storage_work(volumes, mac, key=key, images=images,
                                       drained=mac in drained)
    elif role == "dom0":
        work["dom0"] = dom0_work(volumes, mac, key=key, portals=portals, drained=drained,
                                 standby=standby)
    return work


__all__ = ["ImageSource", "dom0_work", "node_work", "portal", "reachable", "storage_work"]
