"""The Xen toolstack (``xl``) as the dom0 agent uses it: what runs, what the host has, and a
guest's config file; every call a subprocess with a timeout.

Parsing is pure (``parse_list``, ``parse_list_long``, ``parse_info``, ``guest_config``); the
``async`` functions only run ``xl``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nodeagent.errors import XenError
from nodeagent.plugins import ToolUnavailable, run_tool
from nodeagent.roles.guestnet import vifname

TIMEOUT = 30.0
CREATE_TIMEOUT = 180.0
GUEST_SLICE = "netboot-guests.slice"
DOM0 = "Domain-0"
# The dom0 image's lean hotplug scripts (elements/xen-dom0): xl runs them while a migrating
# guest is suspended, so their cost is downtime.
VIF_SCRIPT = "/etc/xen/scripts/vif-netboot"
BLOCK_SCRIPT = "/etc/xen/scripts/block-netboot"
_SAFE = re.compile(r"^[A-Za-z0-9_.:/=,+@ -]*$")  # what a value in a guest config may hold
_STATES = {"r": "running", "b": "blocked", "p": "paused", "s": "shutdown", "c": "crashed",
           "d": "dying"}


@dataclass(frozen=True)
class Domain:
    name: str
    domid: int
    memory_mib: int
    vcpus: int
    state: str  # running, blocked, paused, shutdown, crashed, dying (first flag set)
    cpu_seconds: float
    uuid: str | None = None


@dataclass(frozen=True)
class GuestSpec:
    """What the control plane asks this dom0 to run (one work entry)."""

    id: str
    name: str  # the domain name, nb-<instance>
    uuid: str
    epoch: int
    running: bool  # desired: running (True) or stopped
    memory_mib: int
    vcpus: int
    device: str
    kernel: str  # local paths, once fetched and checked
    ramdisk: str | None
    cmdline: str
    nics: tuple[tuple[str, str], ...]  # (mac, bridge)
    hard: bool = False  # stopped without a clean shutdown (the instance is being destroyed)
    reboots: int = 0  # reboot requests so far: one past what this dom0 applied means reboot
    # Whether it may be created now (its volume's array assembled here, its image's kernel
    # known): a running guest is never stopped for want of it.
    startable: bool = True
    # Resource controls (configserver.cloud.resources): Xen's defaults when not given.
    cpu_weight: int = 256
    cpu_cap: int = 0  # % of one CPU; 0: none
    net_rate: int = 0  # bytes/s the vifs may send; 0: unlimited
    max_memory_mib: int = 0  # balloon ceiling; 0: the memory

    @property
    def controls(self) -> dict[str, int]:
        """What a running guest gets changed in place (``Guests`` keeps what it applied)."""
        return {"memory_mib": self.memory_mib, "cpu_weight": self.cpu_weight,
                "cpu_cap": self.cpu_cap, "net_rate": self.net_rate}


def parse_list(text: str) -> list[Domain]:
    """``xl list``'s table (a header, then name, id, mem, vcpus, state flags, time)."""
    domains = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 6:
            continue
        name, domid, memory, vcpus, flags, seconds = fields[-6:]
        if len(fields) > 6:
            name = " ".join(fields[:-5])
        try:
            state = next((_STATES[f] for f in flags if f in _STATES), "blocked")
            domains.append(Domain(name, int(domid), int(memory), int(vcpus), state,
                                  float(seconds)))
        except ValueError:
            raise XenError(f"xl list: cannot read the line {line!r}") from None
    return domains


def parse_list_long(text: str) -> dict[int, str]:
    """Domain id -> UUID from ``xl list -l`` (JSON)."""
    try:
        entries = json.loads(text or "[]")
    except ValueError as exc:
        raise XenError(f"xl list -l: not JSON: {exc}") from None
    found = {}
    for entry in entries if isinstance(entries, list) else []:
        info = ((entry or {}).get("config") or {}).get("c_info") or {}
        if isinstance(entry.get("domid"), int) and isinstance(info.get("uuid"), str):
            found[entry["domid"]] = info["uuid"]
    return found


def parse_info(text: str) -> dict[str, Any]:
    """The facts placement and the guest type need from ``xl info``."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    caps = values.get("virt_caps", "").split()

    def number(key: str) -> int | None:
        try:
            return int(values[key])
        except (KeyError, ValueError):
            return None

    version = ".".join(values[k] for k in ("xen_major", "xen_minor") if k in values)
    return {"total_memory_mib": number("total_memory"), "free_memory_mib": number("free_memory"),
            "nr_cpus": number("nr_cpus"), "hap": "hap" in caps, "pv": "pv" in caps or not caps,
            "version": version + values.get("xen_extra", "") if version else None,
            "scheduler": values.get("xen_scheduler") or None}


def _quoted(value: str, what: str) -> str:
    if not _SAFE.match(value):
        raise XenError(f"refusing {what} {value!r} in a guest config")
    return f'"{value}"'


def guest_config(spec: GuestSpec, *, hap: bool) -> str:
    """The xl config file of ``spec``: PVH where the host has hardware paging, else PV. Each
    vif is named after its MAC (``guestnet.vifname``): the guest network rules know it by
    that name on any dom0."""
    rate = f",rate={int(spec.net_rate)}B/s" if spec.net_rate else ""
    vifs = ", ".join(_quoted(f"mac={mac},bridge={bridge},vifname={vifname(mac, index)}{rate},"
                             f"script={VIF_SCRIPT}", "vif")
                     for index, (mac, bridge) in enumerate(spec.nics))
    disk = f"format=raw,vdev=xvda,access=rw,script={BLOCK_SCRIPT},target={spec.device}"
    lines = [
        f"name = {_quoted(spec.name, 'name')}",
        f"uuid = {_quoted(spec.uuid, 'uuid')}",
        f'type = "{"pvh" if hap else "pv"}"',
        f"memory = {int(spec.memory_mib)}",
        *([f"maxmem = {int(spec.max_memory_mib)}"]
          if spec.max_memory_mib > spec.memory_mib else []),
        f"vcpus = {int(spec.vcpus)}",
        *([f"cpu_weight = {int(spec.cpu_weight)}"] if spec.cpu_weight != 256 else []),
        *([f"cap = {int(spec.cpu_cap)}"] if spec.cpu_cap else []),
        f"kernel = {_quoted(spec.kernel, 'kernel')}",
        *([f"ramdisk = {_quoted(spec.ramdisk, 'ramdisk')}"] if spec.ramdisk else []),
        f"extra = {_quoted(spec.cmdline, 'kernel command line')}",
        f"disk = [ {_quoted(disk, 'disk')} ]",
        f"vif = [ {vifs} ]",
        'on_poweroff = "destroy"',
        'on_reboot = "restart"',
        'on_crash = "destroy"',
    ]
    return "\n".join(lines) + "\n"


async def _xl(*args: str, timeout: float = TIMEOUT) -> str:
    try:
        return await run_tool(["xl", *args], timeout)
    except ToolUnavailable as exc:
        raise XenError(exc.message) from None


async def domains() -> list[Domain]:
    """What runs now, with UUIDs (Domain-0 included)."""
    table = parse_list(await _xl("list"))
    uuids = parse_list_long(await _xl("list", "-l"))
    return [Domain(d.name, d.domid, d.memory_mib, d.vcpus, d.state, d.cpu_seconds,
                   uuids.get(d.domid)) for d in table]


async def info() -> dict[str, Any]:
    return parse_info(await _xl("info"))


def create_argv(config_path: str, *, systemd_run: str | None) -> list[str]:
    """``xl create``, in a systemd scope of its own when systemd is there: the ``xl``
    process that watches the domain (its on_reboot, on_crash) outlives the create, and must
    not live in the agent's service, whose memory limit would throttle the build (it maps the
    guest's memory) and whose restart would kill it."""
    argv = ["xl", "create", config_path]
    if systemd_run is None:
        return argv
    return [systemd_run, "--quiet", "--scope", "--collect", f"--slice={GUEST_SLICE}",
            f"--description=xl for the guest of {config_path}", *argv]


async def create(config_path: str) -> None:
    argv = create_argv(config_path, systemd_run=shutil.which("systemd-run"))
    try:
        await run_tool(argv, CREATE_TIMEOUT)
    except ToolUnavailable as exc:
        raise XenError(exc.message) from None


async def shutdown(name: str, timeout: float) -> None:
    """A clean shutdown, waited for at most ``timeout`` seconds (XenError if not done)."""
    await _xl("shutdown", "-w", name, timeout=timeout)


async def destroy(name: str) -> None:
    await _xl("destroy", name)


async def reboot(name: str, timeout: float) -> None:
    """A clean reboot, waited for (``on_reboot = "restart"`` brings the guest back as a new
    domain; waiting keeps a pass from seeing it briefly gone and creating it twice)."""
    await _xl("reboot", "-w", name, timeout=timeout)


async def sched_credit(name: str, weight: int, cap: int, scheduler: str | None) -> None:
    """Weight and cap with the host's scheduler (``xl info``'s ``xen_scheduler``: Xen 4.17
    defaults to credit2; credit has the same two)."""
    if scheduler not in ("credit", "credit2"):
        raise XenError(f"the {scheduler or 'unknown'} scheduler has no weight and cap")
    await _xl(f"sched-{scheduler}", "-d", name, "-w", str(int(weight)), "-c", str(int(cap)))


async def unpause(name: str) -> None:
    await _xl("unpause", name)


async def exists(name: str) -> bool:
    """Whether a domain of that name is here (in any state)."""
    return any(d.name == name for d in parse_list(await _xl("list")))


async def mem_set(name: str, mib: int) -> None:
    await _xl("mem-set", name, f"{int(mib)}m")


RATE_INTERVAL_US = 50_000  # xl's own default replenish interval


async def vif_rate(domid: int, index: int, rate: int) -> None:
    """The vif's send limit, live: netback follows its backend's ``rate`` key in xenstore
    (bytes per interval, interval in microseconds); 0 lifts it."""
    per_interval = max(1, rate * RATE_INTERVAL_US // 1_000_000) if rate else (1 << 62)
    key = f"/local/domain/0/backend/vif/{int(domid)}/{int(index)}/rate"
    try:
        await run_tool(["xenstore-write", key, f"{per_interval},{RATE_INTERVAL_US}"], TIMEOUT)
    except ToolUnavailable as exc:
        raise XenError(exc.message) from None


def spec_from_work(entry: Mapping[str, Any], kernel: str = "",
                   ramdisk: str | None = None) -> GuestSpec:
    """A GuestSpec from a work entry (the shape is the server's: docs/api.md); the kernel
    and initramfs paths are filled in once fetched, just before a create."""
    try:
        nics: Sequence[Mapping[str, Any]] = entry.get("nics") or []
        return GuestSpec(
            id=str(entry["id"]), name=str(entry["domain"]), uuid=str(entry["uuid"]),
            epoch=int(entry["epoch"]), running=entry["desired"] == "running",
            memory_mib=int(entry["memory_mib"]), vcpus=int(entry["vcpus"]),
            device=str(entry["device"]), kernel=kernel, ramdisk=ramdisk,
            cmdline=str(entry.get("cmdline") or ""),
            nics=tuple((str(n["mac"]), str(n.get("bridge") or "xenbr0")) for n in nics),
            hard=bool(entry.get("hard")), reboots=int(entry.get("reboots") or 0),
            startable=bool(entry.get("startable", True)),
            cpu_weight=int(entry.get("cpu_weight") or 256),
            cpu_cap=int(entry.get("cpu_cap") or 0), net_rate=int(entry.get("net_rate") or 0),
            max_memory_mib=int(entry.get("max_memory_mib") or 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise XenError(f"malformed instance in the work: {exc!r}") from None


__all__ = ["DOM0", "GUEST_SLICE", "Domain", "GuestSpec", "create", "create_argv", "destroy",
           "domains", "exists", "guest_config", "info", "mem_set", "parse_info", "parse_list",
           "parse_list_long", "reboot", "sched_credit", "shutdown", "spec_from_work",
           "unpause", "vif_rate"]
