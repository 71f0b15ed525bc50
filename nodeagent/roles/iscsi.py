"""The iSCSI initiator (open-iscsi's ``iscsiadm``): our own iface, node records with CHAP, and
the live sessions as sysfs shows them.

Node records are static (no discovery) and live under the ``netboot`` iface, whose initiator
name is the one the control plane issued to this dom0. Timeouts are short on purpose: a leg
whose storage node is gone must fail within seconds so that md RAID1 drops it and the guest
goes on writing to the other leg; the md bitmap makes its return cheap.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from nodeagent.errors import IscsiError
from nodeagent.plugins import ToolUnavailable, run_tool

log = logging.getLogger(__name__)

IFACE = "netboot"
TARGET_PREFIX = "iqn.2026-12.net.netboot:vol-"
TIMEOUT = 30.0
LOGIN_TIMEOUT = 45.0
NODE_SETTINGS = (
    ("node.startup", "manual"),
    ("node.session.auth.authmethod", "CHAP"),
    ("node.session.timeo.replacement_timeout", "3"),
    ("node.conn[0].timeo.noop_out_interval", "2"),
    ("node.conn[0].timeo.noop_out_timeout", "3"),
    ("node.conn[0].timeo.login_timeout", "5"),
    # A login to a node that is down fails in seconds, not after 8 tries (the agent retries).
    ("node.session.initial_login_retry_max", "1"),
)
# iscsiadm exit codes: 15 = already logged in / session exists, 21 = no records / no session.
ALREADY = "(15)"
NO_OBJECTS = "(21)"


@dataclass(frozen=True)
class Session:
    target: str
    portal: str  # "ip:port"
    state: str  # LOGGED_IN, FAILED, FREE...
    devices: tuple[str, ...]  # /dev/sdX of its LUNs

    @property
    def usable(self) -> bool:
        return self.state == "LOGGED_IN" and bool(self.devices)


async def _iscsiadm(*args: str, timeout: float = TIMEOUT, ok: tuple[str, ...] = ()) -> str:
    try:
        return await run_tool(["iscsiadm", *args], timeout)
    except ToolUnavailable as exc:
        if any(code in exc.message for code in ok):
            return ""
        raise IscsiError(exc.message) from None


async def ensure_iface(initiator: str) -> None:
    """The ``netboot`` iface with this dom0's initiator name."""
    try:
        shown = await _iscsiadm("-m", "iface", "-I", IFACE, "-o", "show")
    except IscsiError:
        await _iscsiadm("-m", "iface", "-I", IFACE, "-o", "new")
        shown = ""
    if f"iface.initiatorname = {initiator}" not in shown:
        await _iscsiadm("-m", "iface", "-I", IFACE, "-o", "update",
                        "-n", "iface.initiatorname", "-v", initiator)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def sessions(sysfs: Path = Path("/sys")) -> dict[tuple[str, str], Session]:
    """Our sessions by (target, portal), from sysfs (no subprocess)."""
    out = {}
    for entry in sorted((sysfs / "class/iscsi_session").glob("session*")):
        target = _read(entry / "targetname")
        if not target.startswith(TARGET_PREFIX):
            continue
        number = entry.name.removeprefix("session")
        portal = ""
        for connection in sorted((sysfs / "class/iscsi_connection").glob(f"connection{number}:*")):
            address = _read(connection / "persistent_address")
            port = _read(connection / "persistent_port")
            if address:
                portal = f"{address}:{port or 3260}"
                break
        device = entry / "device"
        blocks = sorted(p.name for p in device.glob("target*/*/block/*"))
        out[(target, portal)] = Session(target, portal, _read(entry / "state"),
                                        tuple(f"/dev/{name}" for name in blocks))
    return out


async def login(target: str, portal: str, user: str, secret: str) -> None:
    """Create or update the node record, then log in (already logged in is fine)."""
    node = ("-m", "node", "-T", target, "-p", portal, "-I", IFACE)
    try:
        await _iscsiadm(*node, "-o", "show")
    except IscsiError:
        await _iscsiadm(*node, "-o", "new")
    for name, value in (*NODE_SETTINGS, ("node.session.auth.username", user),
                        ("node.session.auth.password", secret)):
        await _iscsiadm(*node, "-o", "update", "-n", name, "-v", value)
    log.info("logging in to %s at %s", target, portal)
    await _iscsiadm(*node, "--login", timeout=LOGIN_TIMEOUT, ok=(ALREADY,))


async def logout(target: str, portal: str) -> None:
    """Log out and forget the node record (neither existing is fine)."""
    node = ("-m", "node", "-T", target, "-p", portal, "-I", IFACE)
    log.info("logging out of %s at %s", target, portal)
    await _iscsiadm(*node, "--logout", ok=(NO_OBJECTS,))
    await _iscsiadm(*node, "-o", "delete", ok=(NO_OBJECTS,))


def device_alive(device: str) -> bool:
    """Whether the SCSI device under ``device`` is running (not offline or blocked)."""
    state = _read(Path("/sys/block") / os.path.basename(device) / "device/state")
    return state == "running"
