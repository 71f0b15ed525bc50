"""A dom0's guests, carried out: the plan of ``guests.py`` run through ``xl``, with the claim
confirmed by the config server just before each ``xl create``, and a report of what runs.

The toolstack, the claim check, the kernel fetch, the usage counters and the loading of the
guest network rules are injected (``Toolstack``, ``Confirm``, ``Fetch``, ``Usage``,
``LoadRules``): the agent passes ``xen``, its server session, an HTTP download checked by
sha256, ``guestusage`` and ``guestnet.apply``; the tests pass fakes. Guests
run on when the agent stops or restarts: nothing here ties a domain's life to the agent's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from nodeagent.errors import RoleError, ServerError, XenError
from nodeagent.roles import blockmap, guestnet, guestusage
from nodeagent.roles.guests import DOMAIN_PREFIX, Action, Do, plan
from nodeagent.roles.migration import INCOMING, Migrations
from nodeagent.roles.xen import Domain, GuestSpec, guest_config, spec_from_work

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 60.0
CONFIG_DIR = Path("/run/nodeagent/guests")
KERNEL_DIR = Path("/var/lib/nodeagent/kernels")

Confirm = Callable[[str, int], Awaitable[bool]]  # (instance name, epoch) -> held?
Fetch = Callable[[str, Path], Awaitable[None]]  # (url, destination) -> file written
Usage = Callable[[int], dict[str, int]]  # domid -> its network and disk byte counters
LoadRules = Callable[[str, Path], Awaitable[None]]  # (nft ruleset, file to keep it in)
Disk = Callable[[str], Awaitable[str]]  # the array's path -> the guest's disk device


async def mapped_disk(array: str) -> str:
    """The guest's disk: the device-mapper device over the array (``blockmap``), the same
    path on every dom0, and one a migration's target can make before the array is there."""
    return await blockmap.linear(array.rsplit("/", 1)[-1])


class Toolstack(Protocol):
    async def domains(self) -> list[Domain]: ...
    async def info(self) -> dict[str, Any]: ...
    async def create(self, config_path: str) -> None: ...
    async def shutdown(self, name: str, timeout: float) -> None: ...
    async def destroy(self, name: str) -> None: ...
    async def reboot(self, name: str, timeout: float) -> None: ...
    async def sched_credit(self, name: str, weight: int, cap: int,
                           scheduler: str | None) -> None: ...
    async def mem_set(self, name: str, mib: int) -> None: ...
    async def vif_rate(self, domid: int, index: int, rate: int) -> None: ...


class Guests:
    def __init__(self, xl: Toolstack, confirm: Confirm, fetch: Fetch, *,
                 config_dir: Path = CONFIG_DIR, kernel_dir: Path = KERNEL_DIR,
                 shutdown_timeout: float = SHUTDOWN_TIMEOUT,
                 usage: Usage = guestusage.counters,
                 load_rules: LoadRules = guestnet.apply,
                 migrations: Migrations | None = None, disk: Disk = mapped_disk) -> None:
        self.xl = xl
        self.disk = disk
        self.migrations = migrations
        self.usage = usage
        self.load_rules = load_rules
        self._loaded: str | None = None  # the guest network rules last loaded
        self.confirm = confirm
        self.fetch = fetch
        self.config_dir = config_dir
        self.kernel_dir = kernel_dir
        self.shutdown_timeout = shutdown_timeout
        self.events: list[dict[str, Any]] = []  # since the last report

    async def reconcile(self, entries: Sequence[Mapping[str, Any]],
                        devices_ready: Callable[[str], bool],
                        network: Mapping[str, Any] | None = None,
                        incoming: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
        """One pass over the work's guests; the report's ``guests`` part.

        First the guest network rules (``guestnet``) for these guests and ``network``, the
        work's policy: loaded again whenever they change, and no guest is created while
        they could not be (a running one keeps running). Stops (destroys, shutdowns) and
        reboots run side by side, each bounded by its own timeout; creates one at a time
        (each maps a guest's memory). One guest's failure, whether ``xl``, the claim check,
        the kernel's download or the local files, is that guest's error in the report, never
        the end of the pass.

        ``incoming``: guests migrating here (``migration``): their network rules are loaded
        before they arrive, and their domains are left alone until they run here under the
        claim. A guest that left for another dom0 is neither created again nor reported."""
        facts = await self.xl.info()
        rules_error = await self._rules([*entries, *incoming], network)
        moves = self.migrations
        specs, errors, kept, sources = [], {}, set(), {}
        if moves is not None:
            kept |= moves.arriving() | moves.leaving()
        for entry in entries:
            try:
                spec = spec_from_work(entry)
            except RoleError as exc:  # malformed: its domain, if any, is left as it is
                errors[str(entry.get("id"))] = exc.message
                if isinstance(entry.get("domain"), str):
                    kept.add(entry["domain"])
                continue
            specs.append(spec)
            sources[spec.id] = entry
        running = await self.xl.domains()
        applied = self._reboots_applied(specs, running)
        actions = plan(specs, running, applied, kept)

        async def attempt(action: Action) -> None:
            try:
                if action.do == Do.CREATE and rules_error:
                    raise XenError(f"not started without its network rules: {rules_error}")
                await self._carry_out(action, facts, devices_ready, sources)
            except (RoleError, ServerError, OSError) as exc:
                message = getattr(exc, "message", None) or str(exc)
                if action.spec is not None:
                    errors[action.spec.id] = message
                log.warning("guest %s: %s failed: %s", action.name, action.do, message)

        stops = [a for a in actions if a.do in (Do.DESTROY, Do.SHUTDOWN)]
        await asyncio.gather(*(attempt(a) for a in stops))
        for action in actions:
            if action.do == Do.CREATE:
                await attempt(action)
        await asyncio.gather(*(attempt(a) for a in actions if a.do == Do.REBOOT))
        if moves is not None:
            moves.step(incoming, [e for e in entries if e.get("migrate")], self._fetch_files)
        now = await self.xl.domains()
        for spec in specs:
            try:
                await self._controls(spec, now, facts.get("scheduler"))
            except (RoleError, OSError) as exc:
                errors[spec.id] = getattr(exc, "message", None) or str(exc)
        report = self._report([s for s in specs if moves is None or s.name not in moves.sent],
                              now, facts, errors)
        report["migrations"] = moves.report() if moves is not None else []
        report["network"] = {"rules": self._loaded is not None and not rules_error,
                             "ports": len(guestnet.ports(entries)), "error": rules_error}
        return report

    async def destroy_unclaimed(self, entries: Sequence[Mapping[str, Any]]) -> None:
        """Destroy, before anything else in a pass, every domain of ours that the work names
        no claim of (a dom0 back from a lost link: its guests restarted elsewhere), and what
        an aborted migration left received here (even if the claim came here since)."""
        named = {e.get("domain") for e in entries}
        moves = self.migrations
        kept = moves.arriving() | moves.leaving() if moves is not None else set()
        abandoned = set(moves.abandoned) if moves is not None else set()
        for domain in await self.xl.domains():
            if domain.state == "dying" or not domain.name.startswith(DOMAIN_PREFIX):
                continue
            if domain.name.removesuffix(INCOMING) in abandoned and domain.name not in kept:
                await self._stop_hard(domain.name, "its migration here was aborted")
            elif domain.name not in named and domain.name not in kept:
                await self._stop_hard(domain.name, "this dom0 holds no claim on it")
        if moves is not None:
            moves.abandoned -= abandoned

    async def self_fence(self, reason: str) -> int:
        """Destroy every guest here (no heartbeat accepted for too long: the control plane
        may restart them elsewhere); how many were destroyed."""
        doomed = [d.name for d in await self.xl.domains()
                  if d.name.startswith(DOMAIN_PREFIX) and d.state != "dying"]
        for name in doomed:
            await self._stop_hard(name, f"self-fenced: {reason}")
        return len(doomed)

    async def _stop_hard(self, name: str, reason: str) -> None:
        try:
            await self.xl.destroy(name)
        except XenError as exc:
            log.warning("guest %s: destroy failed: %s", name, exc.message)
            return
        self._event(name, "destroyed", reason=reason)

    async def _rules(self, entries: Sequence[Mapping[str, Any]],
                     network: Mapping[str, Any] | None) -> str | None:
        """Load the guest network rules if they changed; the error, if they could not be."""
        text = guestnet.ruleset(guestnet.ports(entries), guestnet.policy_from_work(network))
        if text == self._loaded:
            return None
        try:
            await self.load_rules(text, self.config_dir / "network.nft")
        except (RoleError, OSError) as exc:
            message = getattr(exc, "message", None) or str(exc)
            log.warning("guest network rules: %s", message)
            return message
        self._loaded = text
        log.info("guest network rules loaded (%d vifs)", len(guestnet.ports(entries)))
        return None

    async def _with_kernel(self, spec: GuestSpec, entry: Mapping[str, Any]) -> GuestSpec:
        """``spec`` with its kernel and initramfs fetched (or found cached) and checked."""
        kernel = await self._file(entry.get("kernel"))
        if not kernel:
            raise XenError("the work names no kernel for it")
        ramdisk = await self._file(entry.get("ramdisk")) if entry.get("ramdisk") else None
        return replace(spec, kernel=kernel, ramdisk=ramdisk)

    async def _fetch_files(self, entry: Mapping[str, Any]) -> None:
        """A guest's kernel and initramfs here, under the same paths as on any dom0."""
        await self._with_kernel(spec_from_work(entry), entry)

    async def _file(self, source: Any) -> str | None:
        """A kernel or initramfs from the config server, kept under its sha256."""
        if not isinstance(source, Mapping) or not source.get("url"):
            return None
        digest = str(source.get("sha256") or "")
        if len(digest) != 64:
            raise XenError(f"{source['url']}: no sha256 to check it against")
        path = self.kernel_dir / digest
        if path.exists():
            return str(path)
        self.kernel_dir.mkdir(parents=True, exist_ok=True)
        # Its own partial file: two guests (or a migration) may fetch the same one at once.
        partial = path.with_name(f"{digest}.{secrets.token_hex(4)}.part")
        try:
            await self.fetch(str(source["url"]), partial)
            got = await asyncio.to_thread(_sha256, partial)
            if got != digest:
                raise XenError(f"{source['url']}: sha256 {got} is not the announced {digest}")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return str(path)

    async def _carry_out(self, action: Action, facts: Mapping[str, Any],
                         devices_ready: Callable[[str], bool],
                         sources: Mapping[str, Mapping[str, Any]]) -> None:
        if action.do == Do.DESTROY:
            await self.xl.destroy(action.name)
            self._event(action.name, "destroyed", reason=action.reason)
        elif action.do == Do.SHUTDOWN:
            try:
                await self.xl.shutdown(action.name, self.shutdown_timeout)
                self._event(action.name, "shut down")
            except XenError as exc:
                await self.xl.destroy(action.name)
                self._event(action.name, "destroyed", reason=f"no clean shutdown: {exc}")
        elif action.do == Do.CREATE and action.spec is not None:
            await self._create(action.spec, sources.get(action.spec.id) or {}, facts,
                               devices_ready)
        elif action.do == Do.REBOOT and action.spec is not None:
            self._applied(action.name, action.spec.reboots)  # asked once, not every pass
            await self.xl.reboot(action.name, self.shutdown_timeout)
            self._event(action.name, "rebooted", reboots=action.spec.reboots)

    async def _controls(self, spec: GuestSpec, running: Sequence[Domain],
                        scheduler: str | None) -> None:
        """A running guest's memory, scheduler weight and cap, and vif rate, changed in place
        when the work's differ from what this dom0 applied last to this domain
        (``<domain>.res``, with its domid). A guest created here got them from its config;
        one xl made again (a reboot, a crash) from that stored config gets them all again."""
        domain = next((d for d in running if d.name == spec.name), None)
        if not spec.running or domain is None or domain.uuid not in (None, spec.uuid):
            return
        record = self.config_dir / f"{spec.name}.res"
        try:
            applied = json.loads(record.read_text())
        except (OSError, ValueError):
            # Found running with no record (made by an agent before this one): taken to have
            # Xen's defaults and the memory it has now.
            applied = {"cpu_weight": 256, "cpu_cap": 0, "net_rate": 0,
                       "memory_mib": spec.memory_mib, "domid": None}
        created = applied.get("created") or {}
        if applied.get("domid") not in (None, domain.domid):
            applied = dict(created)  # a new domain from the create-time config
        wanted = spec.controls
        if {k: applied.get(k) for k in wanted} == wanted:
            if applied.get("domid") != domain.domid:
                self._record_controls(spec, domain.domid, created)
            return
        if (applied.get("cpu_weight"), applied.get("cpu_cap")) != (spec.cpu_weight,
                                                                   spec.cpu_cap):
            await self.xl.sched_credit(spec.name, spec.cpu_weight, spec.cpu_cap, scheduler)
        if applied.get("memory_mib") != spec.memory_mib:
            await self.xl.mem_set(spec.name, spec.memory_mib)
        if applied.get("net_rate") != spec.net_rate:
            for index in range(len(spec.nics)):
                await self.xl.vif_rate(domain.domid, index, spec.net_rate)
        self._record_controls(spec, domain.domid, created)
        self._event(spec.name, "resources applied", **wanted)

    def _record_controls(self, spec: GuestSpec, domid: int | None,
                         created: Mapping[str, Any]) -> None:
        """What the domain ``domid`` has now, and what its xl config carries (``created``:
        what a domain xl makes again from it starts with)."""
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.config_dir / f"{spec.name}.res").write_text(
            json.dumps({**spec.controls, "domid": domid, "created": dict(created)}) + "\n")

    def _reboots_applied(self, specs: Sequence[GuestSpec],
                         running: Sequence[Domain]) -> dict[str, int]:
        """Domain name -> the reboot count applied here (``<domain>.boot``); a running guest
        with no record (created by an agent before this one) is taken as up to date."""
        here = {d.name for d in running}
        applied = {}
        for spec in specs:
            record = self.config_dir / f"{spec.name}.boot"
            try:
                applied[spec.name] = int(record.read_text())
            except (OSError, ValueError):
                if spec.name in here:
                    self._applied(spec.name, spec.reboots)
                    applied[spec.name] = spec.reboots
        return applied

    def _applied(self, name: str, reboots: int) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.config_dir / f"{name}.boot").write_text(f"{reboots}\n")

    async def _create(self, spec: GuestSpec, entry: Mapping[str, Any],
                      facts: Mapping[str, Any], devices_ready: Callable[[str], bool]) -> None:
        if not devices_ready(spec.device):
            return  # its volume is not assembled here yet: a later pass starts it
        spec = await self._with_kernel(spec, entry)
        spec = replace(spec, device=await self.disk(spec.device))
        instance = spec.name.removeprefix("nb-")
        if not await self.confirm(instance, spec.epoch):
            self._event(spec.name, "not started", reason="the config server says this "
                        f"dom0 does not hold the claim of epoch {spec.epoch}")
            return
        self.config_dir.mkdir(parents=True, exist_ok=True)
        path = self.config_dir / f"{spec.name}.cfg"
        path.write_text(guest_config(spec, hap=bool(facts.get("hap"))))
        try:
            await self.xl.create(str(path))
        except XenError:
            # A create that failed or timed out can leave the domain half built (paused, no
            # memory): gone, so that the next pass starts it afresh.
            with contextlib.suppress(XenError):
                await self.xl.destroy(spec.name)
            raise
        self._applied(spec.name, spec.reboots)  # a fresh boot is every reboot asked so far
        self._record_controls(spec, None, spec.controls)  # from its config (domid: next pass)
        self._event(spec.name, "created", epoch=spec.epoch)

    def _event(self, domain: str, stage: str, **detail: Any) -> None:
        self.events.append({"time": time.time(), "domain": domain, "stage": stage, **detail})
        log.info("guest %s: %s %s", domain, stage, detail or "")

    def _report(self, specs: Sequence[GuestSpec], running: Sequence[Domain],
                facts: Mapping[str, Any], errors: Mapping[str, str]) -> dict[str, Any]:
        here = {d.name: d for d in running}
        guests = []
        for spec in specs:
            domain = here.get(spec.name)
            guests.append({
                "id": spec.id, "domain": spec.name, "epoch": spec.epoch,
                "state": domain.state if domain else "stopped",
                "domid": domain.domid if domain else None,
                "cpu_seconds": domain.cpu_seconds if domain else None,
                "memory_mib": domain.memory_mib if domain else None,
                **(self.usage(domain.domid) if domain else {}),
                "error": errors.get(spec.id)})
        events, self.events = self.events, []
        return {"xen": dict(facts), "guests": guests, "events": events}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["Guests", "Toolstack"]
