"""LIO iSCSI exports through rtslib-fb: one target per volume leg, one ACL per allowed dom0.

Every function here is blocking (configfs writes): the storage role calls them in a thread.
Only targets whose IQN starts with ``TARGET_PREFIX`` and backstores named ``nb-*`` are ours;
nothing else in LIO is read for a decision or touched.

* The target portal group demands CHAP (``authentication=1``) and has no demo mode
  (``generate_node_acls=0``): an initiator without an ACL of its own sees nothing.
* Each ACL carries the CHAP user and secret the control plane issued for that dom0 and maps
  LUN 0. Deleting an ACL closes that initiator's live session at once: the fencing primitive.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from nodeagent.errors import LioError

log = logging.getLogger(__name__)

TARGET_PREFIX = "iqn.2026-12.net.netboot:vol-"
BACKSTORE_PREFIX = "nb-"
PORTAL = ("0.0.0.0", 3260)


@dataclass(frozen=True)
class Initiator:
    iqn: str
    user: str
    secret: str


@dataclass(frozen=True)
class Export:
    """What one leg's export should be: a block device as LUN 0 of ``target``."""

    target: str
    backstore: str
    device: str
    initiators: tuple[Initiator, ...]


def _rtslib() -> Any:
    try:
        import rtslib_fb  # Debian's python3-rtslib-fb (the storage image's venv sees it)
    except ImportError as exc:
        raise LioError(f"rtslib-fb is not importable: {exc}") from None
    return rtslib_fb


def _ours(target_wwn: str) -> bool:
    return target_wwn.startswith(TARGET_PREFIX)


def apply(exports: list[Export]) -> dict[str, dict[str, Any]]:
    """Make LIO's exports of our volumes exactly ``exports``; per target: state and sessions.

    Targets and backstores of ours that are not wanted are removed (their data is not: that is
    the logical volume's business). Returns ``{target: {"state", "error", "sessions"}}``.
    """
    rtslib = _rtslib()
    try:
        root = rtslib.RTSRoot()
        fabric = rtslib.FabricModule("iscsi")
    except Exception as exc:  # rtslib raises its own errors and OSError alike
        raise LioError(f"LIO is not usable: {exc}") from None
    wanted = {export.target: export for export in exports}
    for target in list(fabric.targets):
        if _ours(target.wwn) and target.wwn not in wanted:
            log.info("removing export %s", target.wwn)
            target.delete()
    stores = {so.name: so for so in root.storage_objects if so.plugin == "block"}
    for name, store in list(stores.items()):
        if name.startswith(BACKSTORE_PREFIX) and not any(e.backstore == name
                                                         for e in exports):
            store.delete()
            del stores[name]
    out: dict[str, dict[str, Any]] = {}
    for export in exports:
        try:
            out[export.target] = _apply_one(rtslib, fabric, stores, export)
        except Exception as exc:
            log.warning("export %s failed: %s", export.target, exc)
            out[export.target] = {"state": "error", "error": f"LIO: {exc}", "sessions": []}
    return out


def _apply_one(rtslib: Any, fabric: Any, stores: dict[str, Any],
               export: Export) -> dict[str, Any]:
    store = stores.get(export.backstore)
    if store is not None and store.udev_path != export.device:
        store.delete()
        store = None
    if store is None:
        store = rtslib.BlockStorageObject(export.backstore, dev=export.device)
        stores[export.backstore] = store
    target = rtslib.Target(fabric, export.target, mode="any")
    tpg = rtslib.TPG(target, 1, mode="any")
    for attribute, value in (("authentication", "1"), ("generate_node_acls", "0"),
                             ("demo_mode_write_protect", "0"), ("cache_dynamic_acls", "0")):
        if str(tpg.get_attribute(attribute)) != value:
            tpg.set_attribute(attribute, value)
    if not any((p.ip_address, p.port) == PORTAL for p in tpg.network_portals):
        rtslib.NetworkPortal(tpg, PORTAL[0], PORTAL[1], mode="create")
    luns = {lun.lun: lun for lun in tpg.luns}
    lun = luns.get(0)
    if lun is not None and lun.storage_object.name != export.backstore:
        lun.delete()
        lun = None
    if lun is None:
        lun = rtslib.LUN(tpg, 0, store)
    wanted = {initiator.iqn: initiator for initiator in export.initiators}
    for acl in list(tpg.node_acls):
        if acl.node_wwn not in wanted:
            log.info("%s: dropping initiator %s", export.target, acl.node_wwn)
            acl.delete()  # closes its live session: fencing
    for initiator in export.initiators:
        acl = rtslib.NodeACL(tpg, initiator.iqn, mode="any")
        if acl.chap_userid != initiator.user:
            acl.chap_userid = initiator.user
        if acl.chap_password != initiator.secret:
            acl.chap_password = initiator.secret
        if not any(m.mapped_lun == 0 for m in acl.mapped_luns):
            rtslib.MappedLUN(acl, 0, lun)
    if not tpg.enable:
        tpg.enable = True
    # Read back from LIO, not from what was asked: the control plane's proof that a fenced
    # initiator is out (no ACL, so no session) before it restarts that dom0's guests.
    acls, sessions = [], []
    for acl in tpg.node_acls:
        acls.append(acl.node_wwn)
        session = acl.session
        if session and session.get("state") == "LOGGED_IN":
            sessions.append(acl.node_wwn)
    return {"state": "exported", "error": None, "sessions": sorted(sessions),
            "acls": sorted(acls)}
