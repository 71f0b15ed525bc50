"""The dom0 role: attach the volumes the control plane assigned to this node.

An attachment is two iSCSI legs (one per storage node, CHAP with this dom0's own initiator
name and secret) under one md RAID1 array named after the volume, ``/dev/md/nb-<id>``: the
same path on every dom0. One reconcile pass, safe to repeat after any crash:

1. log in to every leg of every wanted volume that has no usable session;
2. if the array runs, put back any leg whose session is usable again but which md dropped
   (``--re-add``: the bitmap resyncs only what changed); else assemble it from the legs that
   carry its superblock (degraded if one is missing), or create it when the control plane says
   the volume was never initialized and neither leg has a superblock;
3. stop every array of ours that is not wanted, then log out of its legs. An array that is
   still open is not torn down (the storage nodes' ACLs are what fences this node).

A leg flagged ``leaving`` (its storage node is drained) is taken out of the array and logged
out of before its export goes, so the writer sees no stall; unflagged again, it is logged in
and re-added like any returning leg.

Then the guests (``dom0_guests``): created once their array is assembled, stopped, rebooted
or destroyed as the work says; the report carries what runs (``guests``), the host's Xen
facts (``xen``) and what was done (``events``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from nodeagent.errors import IscsiError, MdError, RoleError
from nodeagent.roles import blockmap, iscsi, md
from nodeagent.roles.dom0_guests import Guests
from nodeagent.roles.xenstore import DomainWatch

log = logging.getLogger(__name__)

DEVICE_WAIT = 10.0
# With guests: a pass at least this often, so a domain started by hand without the claim is
# destroyed within one heartbeat (15 s), not only at the next change of the work.
GUEST_RESYNC = 10.0
# A leg whose login failed (its storage node is down) is tried again after this long, so that
# a pass stays short and the rest of the node's state is reported meanwhile.
LOGIN_RETRY = 15.0


class Dom0Role:
    """Reconciles iSCSI sessions and md arrays toward the ``dom0`` part of the work."""

    name = "dom0"

    def __init__(self, guests: Guests | None = None) -> None:
        self.guests = guests
        self.resync = GUEST_RESYNC if guests is not None else None
        self._initiator: str | None = None
        self._settled = True
        # Legs whose last login failed: (target, portal) -> (monotonic time, error).
        self._failed_logins: dict[tuple[str, str], tuple[float, str]] = {}
        self._domains = DomainWatch()
        self._attachments: dict[str, dict[str, Any]] = {}  # array name -> its latest work
        if guests is not None and guests.migrations is not None:
            guests.migrations.assemble = self._assemble

    async def self_fence(self, reason: str) -> int:
        """Every guest here destroyed (the server has not heard of this dom0 for too long);
        how many."""
        return await self.guests.self_fence(reason) if self.guests is not None else 0

    def busy(self) -> bool:
        """Not every attachment is whole: look again soon (a leg may be back)."""
        return not self._settled

    def snapshot(self, work: dict[str, Any]) -> dict[str, Any] | None:
        wanted = [a for a in work.get("attachments") or [] if isinstance(a, dict)]
        return {"initiator": work.get("initiator"), "detached": [],
                "attachments": [self._state(a) for a in wanted]}

    def fingerprint(self) -> object:
        """What, changed, calls for a pass at once: the arrays, the iSCSI sessions and, with
        guests, a new domain (xenstore's ``@introduceDomain``: one made by hand without the
        claim is destroyed by the pass that follows, within seconds)."""
        arrays = md.arrays()
        moves = self.guests.migrations if self.guests is not None else None
        return (tuple(sorted((a.name, a.degraded, a.sync_action, a.members)
                             for a in arrays.values())),
                tuple(sorted((k, s.state) for k, s in iscsi.sessions().items())),
                self._domains.events, moves.fingerprint() if moves is not None else None)

    async def reconcile(self, work: dict[str, Any]) -> dict[str, Any]:
        if self.guests is not None:  # a guest restarted elsewhere goes before anything else
            try:
                await self.guests.destroy_unclaimed(
                    [g for g in work.get("guests") or [] if isinstance(g, dict)])
            except (RoleError, OSError) as exc:
                log.warning("guests: %s", exc)
        initiator = work.get("initiator")
        wanted = [a for a in work.get("attachments") or [] if isinstance(a, dict)]
        report: dict[str, Any] = {"initiator": initiator, "attachments": [], "detached": []}
        if wanted and isinstance(initiator, str) and initiator != self._initiator:
            await iscsi.ensure_iface(initiator)
            self._initiator = initiator
        moves = self.guests.migrations if self.guests is not None else None
        given_up = moves.given_up if moves is not None else set()
        resuming = moves.resuming() if moves is not None else set()
        self._attachments = {a["md_name"]: a for a in wanted}
        for attachment in wanted:
            if attachment["md_name"] in given_up:  # a guest that left: its array stays down
                report["attachments"].append({**self._state(attachment), "state": "released"})
                continue
            if attachment["md_name"] in resuming:  # a migration's task assembles it
                report["attachments"].append({**self._state(attachment), "state": "standby"})
                continue
            try:
                report["attachments"].append(await self._attach(attachment))
            except RoleError as exc:
                log.warning("volume %s: %s", attachment.get("name"), exc)
                report["attachments"].append(self._state(attachment, error=str(exc)))
        report["detached"] = await self._detach_unwanted(wanted)
        if self.guests is not None:
            self._domains.start()
            try:
                report.update(await self.guests.reconcile(
                    [g for g in work.get("guests") or [] if isinstance(g, dict)],
                    devices_ready=os.path.exists, network=work.get("guest_network"),
                    incoming=[g for g in work.get("incoming") or [] if isinstance(g, dict)]))
            except (RoleError, OSError) as exc:  # xl itself failed: the volumes' report
                log.warning("guests: %s", exc)  # still goes
        leaving = {(a["volume"], leg["node"]) for a in wanted for leg in a.get("legs") or []
                   if leg.get("leaving")}
        self._settled = all(
            a["state"] in ("attached", "standby", "released") or (
                a["state"] == "degraded" and all(
                leg["state"] == "active" or (a["volume"], leg["node"]) in leaving
                for leg in a["legs"]))
            for a in report["attachments"])
        return report

    async def _attach(self, attachment: dict[str, Any]) -> dict[str, Any]:
        name = attachment["md_name"]
        legs = attachment.get("legs") or []
        errors = []
        array = md.arrays().get(name)
        members = {m.device: m.state for m in array.members} if array else {}
        for leg in legs:
            session = iscsi.sessions().get((leg["target"], leg["portal"]))
            if leg.get("leaving"):
                await self._let_go(name, leg, session, members)
                continue
            if session is not None and session.state != "LOGGED_IN":
                # While the initiator still tries to reconnect (FAILED), let it: it will be
                # back by itself. Once it gave up (FREE: the target was gone, or not yet
                # exported again when its node came back), log out and in again; unless md
                # still counts the leg in sync.
                if session.state != "FREE" or any(members.get(d) == "in_sync"
                                                  for d in session.devices):
                    continue
                for device in session.devices:
                    if device in members:
                        await md.fail(name, device)
                await iscsi.logout(leg["target"], leg["portal"])
                session = None
            if session is None:
                key = (leg["target"], leg["portal"])
                failed = self._failed_logins.get(key)
                if failed and time.monotonic() - failed[0] < LOGIN_RETRY:
                    errors.append(f"leg on {leg['node']}: {failed[1]}")  # not again yet
                    continue
                try:
                    await iscsi.login(leg["target"], leg["portal"], attachment["user"],
                                      attachment["secret"])
                    self._failed_logins.pop(key, None)
                except IscsiError as exc:
                    self._failed_logins[key] = (time.monotonic(), str(exc))
                    errors.append(f"leg on {leg['node']}: {exc}")
        devices = await self._leg_devices([leg for leg in legs if not leg.get("leaving")])
        array = md.arrays().get(name)
        if attachment.get("standby") and array is None:
            # A guest migrating here: its legs are logged in, but the array is the source's
            # until it released it.
            return {**self._state(attachment, error="; ".join(errors) or None),
                    "state": "standby"}
        if array is None:
            await self._start(attachment, devices)
        else:
            members = {m.device: m.state for m in array.members}
            for device in devices.values():
                if device is None:
                    continue
                state = members.get(device)
                if (state in (None, "faulty") and iscsi.device_alive(device)
                        and await md.examine(device) == name):
                    await md.readd(name, device)
        return self._state(attachment, error="; ".join(errors) or None)

    @staticmethod
    async def _let_go(name: str, leg: dict[str, Any], session: iscsi.Session | None,
                      members: dict[str, str]) -> None:
        """A leg whose storage node is drained: out of the array while its export is still
        up (md stops writing to it: no stall), then log out. Never the last in-sync leg."""
        if session is None:
            return
        mine = [d for d in session.devices if d in members]
        others = [d for d, state in members.items() if state == "in_sync" and d not in mine]
        if mine and not others:
            log.warning("array %s: leg on %s is leaving but is the only one in sync: kept",
                        name, leg.get("node"))
            return
        for device in mine:
            await md.fail(name, device)
        await iscsi.logout(leg["target"], leg["portal"])
        log.info("array %s: let go of the leg on %s (drained)", name, leg.get("node"))

    async def _leg_devices(self, legs: list[dict[str, Any]]) -> dict[str, str | None]:
        """The block device of each leg (by storage node), waiting briefly for udev."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEVICE_WAIT
        while True:
            found = iscsi.sessions()
            devices: dict[str, str | None] = {}
            for leg in legs:
                session = found.get((leg["target"], leg["portal"]))
                devices[leg["node"]] = (session.devices[0] if session and session.usable
                                        else None)
            pending = [leg for leg in legs
                       if devices[leg["node"]] is None
                       and (s := found.get((leg["target"], leg["portal"]))) is not None
                       and s.state == "LOGGED_IN"]
            if not pending or loop.time() > deadline:
                return devices
            await asyncio.sleep(0.5)

    async def _assemble(self, name: str) -> None:
        """Array ``name`` assembled from its legs, for a guest that migrated here (its source
        stopped it): the legs are logged in since the migration began (``standby``)."""
        attachment = self._attachments.get(name)
        if attachment is None:
            raise MdError(f"{name}: not in this dom0's work")
        legs = [leg for leg in attachment.get("legs") or [] if not leg.get("leaving")]
        await self._start({**attachment, "create": False}, await self._leg_devices(legs))

    async def _start(self, attachment: dict[str, Any], devices: dict[str, str | None]) -> None:
        name = attachment["md_name"]
        present = [d for d in devices.values() if d is not None]
        labelled = [d for d in present if await md.examine(d) == name]
        if labelled:
            await md.assemble(name, labelled)
        elif attachment.get("create") and len(present) == len(devices) == 2:
            if any([await md.examine(d) for d in present]):
                raise MdError(f"a leg of {name} carries another array's superblock")
            await md.create(name, int(attachment["size"]), present)
        elif attachment.get("create"):
            raise MdError(f"{name}: both legs are needed to create the array; "
                             f"have {len(present)}")
        else:
            raise MdError(f"{name}: no leg carries the array's superblock")

    def _state(self, attachment: dict[str, Any], error: str | None = None) -> dict[str, Any]:
        name = attachment["md_name"]
        array = md.arrays().get(name)
        found = iscsi.sessions()
        legs = []
        members = {m.device: m.state for m in array.members} if array else {}
        for leg in attachment.get("legs") or []:
            session = found.get((leg["target"], leg["portal"]))
            device = session.devices[0] if session and session.devices else None
            member = members.get(device) if device else None
            if member == "in_sync":
                state = "active"
            elif member == "rebuilding":
                state = "rebuilding"
            elif member == "faulty":
                state = "faulty"
            else:
                state = "missing"
            legs.append({"node": leg["node"], "state": state,
                         "session": session.state if session else None, "device": device})
        if array is None:
            state, sync = ("error" if error else "attaching"), None
        else:
            sync = {"action": array.sync_action, "percent": array.sync_percent}
            if array.sync_action in ("resync", "recover"):
                state = "resyncing"
            elif array.degraded or any(leg["state"] != "active" for leg in legs):
                state = "degraded"
            else:
                state = "attached"
        return {"volume": attachment["volume"], "state": state,
                "device": md.path(name) if array else None,
                "created": array is not None, "sync": sync, "legs": legs, "error": error}

    async def _detach_unwanted(self, wanted: list[dict[str, Any]]) -> list[str]:
        names = {a["md_name"] for a in wanted}
        # Legs of wanted volumes are _attach's business (a leaving one it lets go of itself,
        # unless it is the last in sync).
        keep = {(leg["target"], leg["portal"]) for a in wanted for leg in a.get("legs") or []}
        wanted_ids = {a["volume"] for a in wanted}
        detached = []
        busy: set[str] = set()
        for name in blockmap.names():  # a guest's disk device, gone with its array
            if name not in names:
                with contextlib.suppress(MdError):  # still open: its guest is still here
                    await blockmap.remove(name)
        for name in md.arrays():
            if name in names:
                continue
            try:
                await blockmap.remove(name)
                await md.stop(name)
            except MdError as exc:
                log.warning("array %s is not wanted here but cannot stop: %s", name, exc)
                busy.add(name)
                continue
            detached.append(name.removeprefix(md.NAME_PREFIX))
        for (target, portal) in iscsi.sessions():
            volume = target.removeprefix(iscsi.TARGET_PREFIX)
            if (target, portal) in keep or f"{md.NAME_PREFIX}{volume}" in busy:
                continue
            try:
                await iscsi.logout(target, portal)
            except IscsiError as exc:
                log.warning("cannot log out of %s: %s", target, exc)
                continue
            if volume not in detached and volume not in wanted_ids:
                detached.append(volume)
        return detached
