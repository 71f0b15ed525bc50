"""md RAID1 across a volume's two legs (``mdadm``), and its state from sysfs.

Arrays use metadata 1.0 (the superblock sits at the end of each leg, so a leg's data starts at
sector 0 and the storage node can fill a leg from an image by itself) with an internal
write-intent bitmap (a leg that comes back resyncs only the regions written while it was
away). Arrays are named after the volume id and appear as ``/dev/md/<name>`` on every dom0.
Only the node agent assembles them (``AUTO -all`` in mdadm.conf).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from nodeagent.errors import MdError
from nodeagent.plugins import ToolUnavailable, run_tool

log = logging.getLogger(__name__)

TIMEOUT = 60.0
NAME_PREFIX = "nb-"


@dataclass(frozen=True)
class Member:
    device: str  # /dev/sdX
    state: str  # in_sync | faulty | spare | rebuilding | ...


@dataclass(frozen=True)
class Array:
    name: str
    device: str  # /dev/mdN
    raid_disks: int
    degraded: int
    sync_action: str  # idle | resync | recover | check ...
    sync_percent: float | None
    members: tuple[Member, ...]


async def _mdadm(*args: str) -> str:
    try:
        return await run_tool(["mdadm", *args], TIMEOUT)
    except ToolUnavailable as exc:
        raise MdError(exc.message) from None


def path(name: str) -> str:
    return f"/dev/md/{name}"


async def examine(device: str) -> str | None:
    """The array name in ``device``'s superblock (without a host prefix), or None."""
    try:
        text = await _mdadm("--examine", "--export", device)
    except MdError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "MD_NAME":
            return value.rpartition(":")[2]
    return None


async def create(name: str, size_bytes: int, devices: list[str]) -> None:
    log.info("creating array %s on %s", name, " ".join(devices))
    await _mdadm("--create", path(name), "--run", "--name", name, "--homehost", "<none>",
                 "--level", "1", "--raid-devices", str(len(devices)), "--metadata", "1.0",
                 "--bitmap", "internal", "--assume-clean", "--size", str(size_bytes // 1024),
                 *devices)


async def assemble(name: str, devices: list[str]) -> None:
    log.info("assembling array %s from %s", name, " ".join(devices))
    await _mdadm("--assemble", path(name), "--run", *devices)


async def readd(name: str, device: str) -> None:
    """Put a returning leg back: ``--re-add`` (bitmap resync), else ``--add`` (full)."""
    for which in ("failed", "detached"):  # whatever md still holds of the old leg
        with contextlib.suppress(MdError):
            await _mdadm("--manage", path(name), "--remove", which)
    try:
        await _mdadm("--manage", path(name), "--re-add", device)
        log.info("array %s: %s re-added", name, device)
    except MdError:
        await _mdadm("--manage", path(name), "--add", device)
        log.info("array %s: %s added (full recovery)", name, device)


async def fail(name: str, device: str) -> None:
    """Take ``device`` out of the array (already failed or not)."""
    with contextlib.suppress(MdError):
        await _mdadm("--manage", path(name), "--fail", device)
    with contextlib.suppress(MdError):
        await _mdadm("--manage", path(name), "--remove", device)


async def stop(name: str) -> None:
    log.info("stopping array %s", name)
    await _mdadm("--stop", path(name))


def _read(file: Path) -> str:
    try:
        return file.read_text().strip()
    except OSError:
        return ""


def _percent(completed: str) -> float | None:
    done, _, total = completed.partition("/")
    try:
        return round(100.0 * int(done) / int(total), 1) if int(total) else None
    except ValueError:
        return None


def arrays(dev: Path = Path("/dev"), sysfs: Path = Path("/sys")) -> dict[str, Array]:
    """Our running arrays by name (``/dev/md/nb-*`` links), from sysfs."""
    out = {}
    links = dev / "md"
    for link in sorted(links.glob(f"{NAME_PREFIX}*")) if links.is_dir() else []:
        node = os.path.basename(os.path.realpath(link))
        md = sysfs / "block" / node / "md"
        if _read(md / "array_state") in ("", "clear", "inactive"):
            continue
        members = []
        for member in sorted(md.glob("dev-*")):
            block = os.path.basename(os.path.realpath(member / "block"))
            members.append(Member(f"/dev/{block}", _state(_read(member / "state"),
                                                          _read(member / "slot"))))
        action = _read(md / "sync_action") or "idle"
        out[link.name] = Array(
            name=link.name, device=f"/dev/{node}",
            raid_disks=int(_read(md / "raid_disks") or 0),
            degraded=int(_read(md / "degraded") or 0), sync_action=action,
            sync_percent=_percent(_read(md / "sync_completed")) if action != "idle" else None,
            members=tuple(members))
    return out


def _state(flags: str, slot: str) -> str:
    parts = set(flags.split(","))
    if "faulty" in parts:
        return "faulty"
    if "in_sync" in parts:
        return "in_sync"
    if slot not in ("", "none"):
        return "rebuilding"
    return "spare"
