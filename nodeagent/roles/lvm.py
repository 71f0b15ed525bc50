"""LVM on a storage node's own disks: which disks are empty, the ``netboot`` volume group, and
one logical volume per volume leg.

A disk is ``ours`` when it is a physical volume of our volume group, ``empty`` when it has no
partitions, no signature ``blkid`` knows, is not mounted or held, and its first and last MiB
read as zeros; anything else is ``foreign`` and never written. The volume group is created, or
extended, only from empty disks, and only when the control plane has placed a leg here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.errors import LvmError
from nodeagent.plugins import ToolUnavailable, run_tool

log = logging.getLogger(__name__)

VG = "netboot"
TAG = "netboot"
READY_TAG = "netboot_zeroed"  # a leg is usable once it has been zeroed end to end
PROBE_BYTES = 1 << 20
TIMEOUT = 60.0
ZERO_TIMEOUT = 1800.0
SKIP_PREFIXES = ("zram", "loop", "nbd", "drbd", "md", "dm-", "sr", "ram")


@dataclass(frozen=True)
class Disk:
    path: str
    size: int
    state: str  # ours | empty | foreign
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "state": self.state, "why": self.why}


async def _run(argv: list[str], timeout: float = TIMEOUT) -> str:
    try:
        return await run_tool(argv, timeout)
    except ToolUnavailable as exc:
        raise LvmError(exc.message) from None


def _report(text: str, section: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for report in json.loads(text).get("report", []):
        rows.extend(report.get(section, []))
    return rows


async def physical_volumes() -> dict[str, str]:
    """``{device: vg name or ""}`` for every LVM physical volume."""
    text = await _run(["pvs", "--reportformat", "json", "-o", "pv_name,vg_name"])
    return {row["pv_name"]: row.get("vg_name", "") for row in _report(text, "pv")}


def _zeros_at_ends(path: str, size: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in {0, max(0, size - PROBE_BYTES)}:
            data = os.pread(fd, PROBE_BYTES, offset)
            if data.count(0) != len(data):
                return False
    finally:
        os.close(fd)
    return True


async def disks() -> list[Disk]:
    """Every whole disk of the node, classified."""
    text = await _run(["lsblk", "--json", "--bytes", "-o",
                       "NAME,PATH,SIZE,TYPE,RO,FSTYPE,MOUNTPOINT"])
    try:
        pvs = await physical_volumes()
    except LvmError:
        pvs = {}
    out = []
    for device in json.loads(text).get("blockdevices", []):
        name, path = device.get("name", ""), device.get("path", "")
        if device.get("type") != "disk" or name.startswith(SKIP_PREFIXES):
            continue
        size = int(device.get("size") or 0)
        out.append(await _classify(device, path, size, pvs))
    return out


async def _classify(device: dict[str, Any], path: str, size: int,
                    pvs: dict[str, str]) -> Disk:
    if path in pvs:
        if pvs[path] == VG:
            return Disk(path, size, "ours")
        return Disk(path, size, "foreign", f"physical volume of {pvs[path] or 'no'} VG")
    if device.get("ro") in (True, "1", 1):
        return Disk(path, size, "foreign", "read-only")
    if device.get("children"):
        return Disk(path, size, "foreign", "has partitions")
    if device.get("fstype") or device.get("mountpoint"):
        return Disk(path, size, "foreign", f"holds {device.get('fstype') or 'a mount'}")
    if size < 64 * PROBE_BYTES:
        return Disk(path, size, "foreign", "smaller than 64 MiB")
    holders = Path("/sys/class/block") / Path(path).name / "holders"
    if holders.is_dir() and any(holders.iterdir()):
        return Disk(path, size, "foreign", "in use by another device")
    try:
        await run_tool(["blkid", "-p", "-o", "export", path], TIMEOUT)
        return Disk(path, size, "foreign", "blkid finds a signature")
    except ToolUnavailable as exc:
        if "(2)" not in exc.message:  # 2: nothing found; anything else: cannot tell
            return Disk(path, size, "foreign", f"cannot probe: {exc.message}")
    try:
        if not await asyncio.to_thread(_zeros_at_ends, path, size):
            return Disk(path, size, "foreign", "holds data (not zeros) with no signature")
    except OSError as exc:
        return Disk(path, size, "foreign", f"cannot read: {exc}")
    return Disk(path, size, "empty")


async def volume_group() -> dict[str, Any] | None:
    """``{"name", "size", "free", "partial"}`` of our volume group, or None if there is none."""
    text = await _run(["vgs", "--reportformat", "json", "--units", "b", "--nosuffix",
                       "-o", "vg_name,vg_size,vg_free,vg_attr"])
    for row in _report(text, "vg"):
        if row.get("vg_name") == VG:
            attr = row.get("vg_attr", "")
            return {"name": VG, "size": int(row["vg_size"]), "free": int(row["vg_free"]),
                    "partial": len(attr) > 3 and attr[3] == "p"}
    return None


async def flush() -> None:
    """Ask every disk of ours to make what it was told durable (a cache flush each).

    LVM's metadata writes reach a disk's volatile cache; a node losing power right after
    would come back without them (seen in the farm: a QEMU killed after ``vgcreate`` came
    back with one disk blank). So every metadata change is followed by a flush.
    """
    devices = [path for path, vg in (await physical_volumes()).items()
               if vg == VG and path.startswith("/dev/")]
    await asyncio.to_thread(_fsync_all, devices)


def _fsync_all(devices: list[str]) -> None:
    for device in devices:
        fd = os.open(device, os.O_RDONLY)
        try:
            os.fsync(fd)  # blkdev_fsync: a FLUSH to the device
        finally:
            os.close(fd)


async def ensure_volume_group(found: list[Disk]) -> dict[str, Any] | None:
    """Create our VG from the empty disks, or extend it with new empty ones; then activate.

    A volume group with a missing disk is used as it is, never extended (a disk that looks
    empty may be the missing one come back blank, or a stranger's)."""
    empty = [disk.path for disk in found if disk.state == "empty"]
    group = await volume_group()
    if group is None and not empty:
        return None
    if group is not None and group["partial"]:
        empty = []
    for path in empty:
        await _run(["pvcreate", "--yes", "--zero", "y", path])
    if group is None:
        log.info("creating volume group %s on %s", VG, " ".join(empty))
        await _run(["vgcreate", "--yes", "--addtag", TAG, VG, *empty])
    elif empty:
        log.info("extending volume group %s with %s", VG, " ".join(empty))
        await _run(["vgextend", "--yes", VG, *empty])
    if empty:
        await flush()
    await _run(["vgchange", "--activate", "y", "--activationmode", "degraded", VG])
    return await volume_group()


async def logical_volumes() -> dict[str, dict[str, Any]]:
    """Our logical volumes: ``{name: {"size", "path", "tags", "active"}}``."""
    text = await _run(["lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
                       "-o", "vg_name,lv_name,lv_size,lv_path,lv_tags,lv_active"])
    out = {}
    for row in _report(text, "lv"):
        if row.get("vg_name") != VG:
            continue
        out[row["lv_name"]] = {"size": int(row["lv_size"]), "path": row["lv_path"],
                               "tags": [t for t in row.get("lv_tags", "").split(",") if t],
                               "active": row.get("lv_active") == "active"}
    return out


def device_path(lv: str) -> str:
    return f"/dev/{VG}/{lv}"


async def create(lv: str, size: int) -> None:
    await _run(["lvcreate", "--yes", "--wipesignatures", "y", "--zero", "n",
                "--addtag", TAG, "--name", lv, "--size", f"{size}b", VG])
    await flush()


async def zero(lv: str) -> None:
    """Zero the whole leg (a new volume never shows an old one's data), then mark it ready."""
    path = device_path(lv)
    await _run(["blkdiscard", "--zeroout", path], ZERO_TIMEOUT)
    await asyncio.to_thread(_fsync_all, [path])
    await mark_zeroed(lv)


async def fill(lv: str, url: str, size: int, sha256: str | None = None) -> None:
    """Copy an image's root file system (``size`` bytes at ``url``) to the start of the leg
    and zero the rest, then mark it ready: both legs of a volume end up identical."""
    path = device_path(lv)
    stop = threading.Event()
    try:
        written = await asyncio.to_thread(_copy, url, path, size, sha256, stop)
    except asyncio.CancelledError:  # the agent stops: the copy ends at its next chunk
        stop.set()                  # instead of holding the agent's exit for the whole leg
        raise
    await _run(["blkdiscard", "--zeroout", "--offset", str(written), path], ZERO_TIMEOUT)
    await asyncio.to_thread(_fsync_all, [path])
    await mark_zeroed(lv)


COPY_CHUNK = 4 << 20
ALIGN = 1 << 20


def _copy(url: str, device: str, size: int, sha256: str | None,
          stop: threading.Event | None = None) -> int:
    """Stream ``url`` onto ``device``; the bytes written, padded with zeros to a MiB. Ends
    (LvmError) at the next chunk once ``stop`` is set; the leg stays unmarked, so the next
    pass fills it again."""
    digest = hashlib.sha256()
    done = 0
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except (OSError, ValueError) as exc:
        raise LvmError(f"cannot fetch {url}: {exc}") from None
    fd = os.open(device, os.O_WRONLY)
    try:
        with response:
            while True:
                if stop is not None and stop.is_set():
                    raise LvmError(f"copying {url} to {device}: the agent is stopping")
                chunk = response.read(COPY_CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                if done + len(chunk) > size:
                    raise LvmError(f"{url} is larger than the {size} bytes announced")
                os.pwrite(fd, chunk, done)
                done += len(chunk)
        if done != size:
            raise LvmError(f"{url}: got {done} bytes of {size}")
        if sha256 and digest.hexdigest() != sha256:
            raise LvmError(f"{url}: sha256 {digest.hexdigest()} is not the announced {sha256}")
        padded = -(-done // ALIGN) * ALIGN
        if padded > done:
            os.pwrite(fd, bytes(padded - done), done)
        os.fsync(fd)
    except OSError as exc:
        raise LvmError(f"writing {device}: {exc}") from None
    finally:
        os.close(fd)
    return padded


async def mark_zeroed(lv: str) -> None:
    await _run(["lvchange", "--addtag", READY_TAG, f"{VG}/{lv}"])
    await flush()


async def carries_array(lv: str) -> bool:
    """Whether the leg holds an md superblock: a dom0 has used it, so it was zeroed once."""
    try:
        await run_tool(["mdadm", "--examine", device_path(lv)], TIMEOUT)
    except ToolUnavailable:
        return False
    return True


async def activate(lv: str) -> None:
    await _run(["lvchange", "--activate", "y", f"{VG}/{lv}"])


async def remove(lv: str) -> None:
    await _run(["lvremove", "--yes", f"{VG}/{lv}"])
    await flush()
