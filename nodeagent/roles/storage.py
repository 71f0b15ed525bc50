"""The storage role: serve the volume legs the control plane placed on this node.

One reconcile pass, safe to repeat at any point after any crash:

1. classify the disks; if a leg is placed here, make sure the ``netboot`` volume group exists
   (created or extended from empty disks only) and is active;
2. for every wanted leg: create its logical volume if missing, zero it end to end unless it is
   already marked zeroed, then export it over iSCSI to exactly the initiators named;
3. drop every export of ours that is not wanted (an initiator that lost access is cut off at
   once), and remove the logical volumes of deleted volumes, and only those: a logical volume
   the control plane does not mention is reported as an orphan, never removed.

Nothing is kept on the node between boots: after a reboot the exports are rebuilt from the
control plane's answer alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from nodeagent.errors import LioError, LvmError
from nodeagent.roles import lio, lvm

log = logging.getLogger(__name__)

DISK_RESCAN = 60.0
# Legs zeroed or filled from an image at once; the others wait their turn ("queued"). Many
# at once only share the disk and the network, and each copy holds a buffer and a thread.
PREPARE_AT_ONCE = 2


class StorageRole:
    """Reconciles LVM and LIO toward the ``storage`` part of the work message."""

    name = "storage"

    def __init__(self) -> None:
        self._zeroing: dict[str, asyncio.Task[None]] = {}  # zeroing or image copy, per leg
        self._steps: dict[str, str] = {}
        self._errors: dict[str, str] = {}
        self._preparing = asyncio.Semaphore(PREPARE_AT_ONCE)
        self._unsettled = False
        self._ready: set[str] = set()  # legs found whole by the last pass
        self._disks: list[lvm.Disk] | None = None
        self._scanned = 0.0

    def fingerprint(self) -> object:
        return None  # nothing on a storage node changes under it that a pass would repair

    def snapshot(self, work: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def busy(self) -> bool:
        """A leg is being zeroed or failed: look again soon."""
        return self._unsettled or any(not task.done() for task in self._zeroing.values())

    async def reconcile(self, work: dict[str, Any]) -> dict[str, Any]:
        wanted = [e for e in work.get("exports") or [] if isinstance(e, dict)]
        removals = [r for r in work.get("remove") or [] if isinstance(r, dict)]
        if self._ready:
            # Access changes first, before the slower disk and LVM scans: an initiator that
            # lost access is cut off within a moment of the control plane saying so.
            await self._export([leg for leg in wanted if leg["lv"] in self._ready])
        group = await lvm.volume_group()
        # The disks are scanned (lsblk, pvs, blkid, reads) when there is something to build,
        # and once a minute for the report; not on every pass.
        scan = (group is None or self._disks is None
                or time.monotonic() - self._scanned > DISK_RESCAN
                or any(leg["lv"] not in self._ready for leg in wanted))
        found = await lvm.disks() if scan or self._disks is None else self._disks
        self._disks, self._scanned = found, time.monotonic() if scan else self._scanned
        report: dict[str, Any] = {"vg": group, "disks": [d.to_json() for d in found],
                                  "exports": [], "removed": [], "orphans": []}
        if wanted and scan:
            try:
                group = await lvm.ensure_volume_group(found)
            except LvmError as exc:
                report["error"] = f"volume group: {exc}"
                group = None
            report["vg"] = group
            if group is not None and any(d.state == "empty" for d in found):
                self._disks = await lvm.disks()
                report["disks"] = [d.to_json() for d in self._disks]
        if group is not None and group["partial"]:
            report["error"] = ("volume group netboot is missing a disk: legs on it are "
                               "lost; nothing is added to it until an operator repairs it")
        volumes = await lvm.logical_volumes() if group is not None else {}
        states: dict[str, dict[str, Any]] = {}
        for leg in wanted:
            states[leg["volume"]] = await self._prepare_leg(leg, volumes, group is not None)
        ready = [leg for leg in wanted if states[leg["volume"]]["state"] == "ready"]
        self._ready = {leg["lv"] for leg in ready}
        exported = await self._export(ready)
        for leg in wanted:
            state = states[leg["volume"]]
            if state["state"] == "ready":
                state = {**state, **exported.get(leg["target"], {
                    "state": "error", "error": "LIO did not export it"})}
            report["exports"].append({"volume": leg["volume"], **state})
        for removal in removals:
            if await self._remove_leg(removal, volumes):
                report["removed"].append(removal["volume"])
        known = {leg["lv"] for leg in wanted} | {r["lv"] for r in removals}
        self._unsettled = any(e["state"] != "exported" for e in report["exports"])
        report["orphans"] = sorted(name for name in volumes
                                   if name.startswith(lio.BACKSTORE_PREFIX)
                                   and name not in known)
        return report

    @staticmethod
    async def _export(legs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Export exactly ``legs`` (and nothing else of ours); per target: state, sessions."""
        exports = [lio.Export(target=leg["target"], backstore=leg["lv"],
                              device=lvm.device_path(leg["lv"]),
                              initiators=tuple(lio.Initiator(i["iqn"], i["user"], i["secret"])
                                               for i in leg.get("initiators") or []))
                   for leg in legs]
        try:
            return await asyncio.to_thread(lio.apply, exports)
        except LioError as exc:
            return {e.target: {"state": "error", "error": str(exc), "sessions": []}
                    for e in exports}

    async def _prepare_leg(self, leg: dict[str, Any], volumes: dict[str, dict[str, Any]],
                           have_group: bool) -> dict[str, Any]:
        name, size = leg["lv"], int(leg["size"])
        image = leg.get("image")
        if image and not (image.get("url") and image.get("size")):
            return {"state": "error", "sessions": [],
                    "error": f"image {image.get('name')} has no root file system to copy"}
        if not have_group:
            return {"state": "error", "error": "no volume group: no empty disk on this node",
                    "sessions": []}
        task = self._zeroing.get(name)
        if task is not None and not task.done():
            return {"state": "creating", "error": None, "sessions": [],
                    "step": self._steps.get(name, "zeroing")}
        if task is not None:
            del self._zeroing[name]
            if not task.cancelled() and task.exception() is not None:
                self._errors[name] = (f"{self._steps.get(name, 'zeroing')} failed: "
                                      f"{task.exception()}")
        volume = volumes.get(name)
        try:
            if volume is None:
                log.info("creating leg %s (%d bytes)", name, size)
                await lvm.create(name, size)
                volume = {"size": size, "tags": [], "active": True}
            elif not volume["active"]:
                await lvm.activate(name)
        except LvmError as exc:
            return {"state": "error", "error": str(exc), "sessions": []}
        if volume["size"] < size:
            return {"state": "error", "error": f"logical volume {name} is {volume['size']} "
                                               f"bytes, smaller than {size}", "sessions": []}
        if lvm.READY_TAG not in volume["tags"] and await lvm.carries_array(name):
            # Zeroed and used before, its tag lost: zeroing it now would destroy a mirror leg.
            log.warning("leg %s holds an array but was not marked zeroed: marking it", name)
            try:
                await lvm.mark_zeroed(name)
            except LvmError as exc:
                return {"state": "error", "error": str(exc), "sessions": []}
            volume = {**volume, "tags": [*volume["tags"], lvm.READY_TAG]}
        if lvm.READY_TAG not in volume["tags"]:
            if image:
                job = lvm.fill(name, image["url"], int(image["size"]), image.get("sha256"))
                step = "copying image"
            else:
                job, step = lvm.zero(name), "zeroing"
            self._zeroing[name] = asyncio.create_task(self._in_turn(name, job, step),
                                                      name=f"prepare-{name}")
            self._steps[name] = "queued"
            return {"state": "creating", "error": self._errors.get(name), "sessions": [],
                    "step": self._steps[name]}
        self._errors.pop(name, None)
        return {"state": "ready", "error": None, "sessions": []}

    async def _in_turn(self, name: str, job: Coroutine[Any, Any, None], step: str) -> None:
        """``job`` once fewer than PREPARE_AT_ONCE others run (``step`` says which it is)."""
        try:
            async with self._preparing:
                self._steps[name] = step
                await job
        finally:
            job.close()  # never started (cancelled while queued): no "never awaited" warning

    async def _remove_leg(self, removal: dict[str, Any],
                          volumes: dict[str, dict[str, Any]]) -> bool:
        name = removal["lv"]
        task = self._zeroing.pop(name, None)
        if task is not None and not task.done():
            task.cancel()
        if name not in volumes:
            return True
        try:
            await lvm.remove(name)
        except LvmError as exc:
            log.warning("cannot remove leg %s: %s", name, exc)
            return False
        log.info("removed leg %s", name)
        return True
