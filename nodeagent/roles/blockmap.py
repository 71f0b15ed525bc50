"""The guests' disks through device-mapper: ``/dev/mapper/nbdisk-<volume>`` over the md array.

A guest's xl config names this device, never the array: on the target of a live migration
the device must exist while the guest's memory arrives, but the array may not be assembled
there until the source stopped it (one array, one dom0). So the target makes the device with
a placeholder table of the array's size (``error``, but for the cache it must show:
``placeholder``), the guest arrives paused on it, and once the source released the array and
it is assembled here, the table is switched to ``linear`` over it before the guest is
unpaused. No I/O can reach the placeholder: the guest is paused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from nodeagent.errors import MdError
from nodeagent.plugins import ToolUnavailable, run_tool
from nodeagent.roles import md

log = logging.getLogger(__name__)

TIMEOUT = 30.0
PREFIX = "nbdisk-"
SECTOR = 512
TAIL = 8  # sectors of a placeholder on the scratch loop device
SCRATCH = Path("/run/nodeagent-scratch/placeholder.img")


def name_for(md_name: str) -> str:
    """``nb-<volume id>`` (the array) -> ``nbdisk-<volume id>``."""
    return PREFIX + md_name.removeprefix(md.NAME_PREFIX)


def path(md_name: str) -> str:
    return f"/dev/mapper/{name_for(md_name)}"


def names(mapper: str = "/dev/mapper") -> list[str]:
    """The arrays (``nb-<volume id>``) that have a guest disk device here."""
    try:
        found = os.listdir(mapper)
    except OSError:
        return []
    return sorted(md.NAME_PREFIX + n.removeprefix(PREFIX) for n in found if n.startswith(PREFIX))


def exists(md_name: str) -> bool:
    return os.path.exists(path(md_name))


async def _dmsetup(*args: str) -> str:
    return await _tool(["dmsetup", *args])


async def _tool(argv: list[str]) -> str:
    try:
        return await run_tool(argv, TIMEOUT)
    except ToolUnavailable as exc:
        raise MdError(exc.message) from None


async def sectors(device: str) -> int:
    try:
        return int((await run_tool(["blockdev", "--getsz", device], TIMEOUT)).strip())
    except (ToolUnavailable, ValueError) as exc:
        raise MdError(f"cannot read the size of {device}: {exc}") from None


async def table(md_name: str) -> str | None:
    """The live table of the device (``0 N linear 9:127 0``), None if there is none."""
    if not exists(md_name):
        return None
    return (await _dmsetup("table", name_for(md_name))).strip()


async def linear(md_name: str) -> str:
    """The device over the assembled array (made, or switched from the placeholder); its
    path. MdError if the array is not there or its size is not the device's."""
    array = md.path(md_name)
    size = await sectors(array)
    wanted = f"0 {size} linear {array} 0"
    current = await table(md_name)
    if current is None:
        await _dmsetup("create", name_for(md_name), "--table", wanted)
        return path(md_name)
    if not is_placeholder(current):
        return path(md_name)
    have = sum(int(line.split()[1]) for line in current.splitlines() if line.strip())
    if have != size:
        raise MdError(f"{name_for(md_name)} is {have} sectors, the array {size}: not switched")
    # A resume with a table loaded swaps it in (the kernel suspends first); without waiting
    # for udev: the device's node is there since the placeholder, and a migrating guest is
    # paused until this returns.
    await _dmsetup("load", name_for(md_name), "--table", wanted)
    await _dmsetup("resume", "--noudevsync", name_for(md_name))
    log.info("%s: now over %s", name_for(md_name), array)
    return path(md_name)


def is_placeholder(current: str) -> bool:
    """Whether a live table is ``placeholder``'s (it starts with ``error``)."""
    return current.split(None, 3)[2:3] == ["error"]


async def placeholder(md_name: str, size_bytes: int, scratch: Path = SCRATCH) -> str:
    """The device of ``size_bytes`` (kept if it is there); its path.

    All ``error`` but its last 4 KiB, which go to a loop device over a scratch file: that
    one segment gives the device a write-back cache, as the array over the iSCSI legs has.
    blkback reads the device's queue once, when xl attaches it during the restore, and
    advertises ``feature-flush-cache`` from it; a device without a cache (``error`` alone)
    left the migrated guest without flushes, its queued flushes failed, and ext4 aborted
    its journal. No discard either way (the ``error`` target has none), as on the array."""
    if not exists(md_name):
        sectors_total = size_bytes // SECTOR
        if sectors_total <= TAIL:
            raise MdError(f"{name_for(md_name)}: {size_bytes} bytes is too small a disk")
        loop = await _scratch_loop(scratch)
        await _dmsetup("create", name_for(md_name), "--table",
                       f"0 {sectors_total - TAIL} error\n"
                       f"{sectors_total - TAIL} {TAIL} linear {loop} 0")
    return path(md_name)


async def _scratch_loop(scratch: Path) -> str:
    """The loop device over ``scratch`` (made once, shared by every placeholder)."""
    found = (await _tool(["losetup", "--associated", str(scratch)])).strip()
    if found:
        return found.split(":", 1)[0]
    scratch.parent.mkdir(parents=True, exist_ok=True)
    with open(scratch, "ab") as file:
        file.truncate(TAIL * SECTOR)
    return (await _tool(["losetup", "--find", "--show", str(scratch)])).strip()


async def remove(md_name: str) -> None:
    """The device gone (nothing if it is not there); MdError while it is open."""
    if exists(md_name):
        await _dmsetup("remove", name_for(md_name))
        log.info("%s removed", name_for(md_name))


__all__ = ["PREFIX", "exists", "linear", "name_for", "names", "path", "placeholder", "remove",
           "table"]
