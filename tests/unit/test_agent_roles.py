"""The cloud roles of the agent: sysfs parsers on recorded trees, and the reconcile passes of
the storage and dom0 roles with their tool drivers replaced by recorders (no subprocess)."""

from __future__ import annotations

import asyncio
import os
import types
from pathlib import Path
from typing import Any

import pytest

from nodeagent.errors import LvmError, MdError, ServerError
from nodeagent.plugins import ToolUnavailable
from nodeagent.roles import Reconciler, dom0, iscsi, lio, lvm, md, storage

VID = "0123456789abcdef"
TARGET = f"iqn.2026-12.net.netboot:vol-{VID}"
DOM0_IQN = "iqn.2026-12.net.netboot:node-525400fad001"
LEGS = [{"node": "52:54:00:fa:5a:01", "portal": "198.18.0.50:3260", "target": TARGET, "lun": 0},
        {"node": "52:54:00:fa:5a:02", "portal": "198.18.0.51:3260", "target": TARGET, "lun": 0}]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


# -- sysfs parsers ------------------------------------------------------------------------------

def _md_tree(root: Path, *, members: dict[str, str], action: str = "idle",
             completed: str = "none", degraded: int = 0) -> None:
    (root / "dev/md").mkdir(parents=True)
    (root / "dev/md127").touch()
    os.symlink("../md127", root / "dev/md" / f"nb-{VID}")
    md_dir = root / "sys/block/md127/md"
    _write(md_dir / "array_state", "clean")
    _write(md_dir / "raid_disks", "2")
    _write(md_dir / "degraded", str(degraded))
    _write(md_dir / "sync_action", action)
    _write(md_dir / "sync_completed", completed)
    for slot, (name, state) in enumerate(members.items()):
        member = md_dir / f"dev-{name}"
        _write(member / "state", state)
        _write(member / "slot", str(slot) if state != "spare" else "none")
        (root / "sys/block" / name).mkdir(parents=True, exist_ok=True)
        os.symlink(root / "sys/block" / name, member / "block")


def test_md_arrays_read_from_sysfs(tmp_path):
    _md_tree(tmp_path, members={"sda": "in_sync", "sdb": "faulty"}, degraded=1)
    arrays = md.arrays(tmp_path / "dev", tmp_path / "sys")
    array = arrays[f"nb-{VID}"]
    assert array.device == "/dev/md127" and array.degraded == 1
    assert [(m.device, m.state) for m in array.members] == [("/dev/sda", "in_sync"),
                                                           ("/dev/sdb", "faulty")]
    assert array.sync_action == "idle" and array.sync_percent is None


def test_md_recovery_progress(tmp_path):
    _md_tree(tmp_path, members={"sda": "in_sync", "sdb": ""}, action="recover",
             completed="131072 / 524288")
    array = md.arrays(tmp_path / "dev", tmp_path / "sys")[f"nb-{VID}"]
    assert array.sync_percent == 25.0
    assert array.members[1].state == "rebuilding"


def test_iscsi_sessions_read_from_sysfs(tmp_path):
    session = tmp_path / "class/iscsi_session/session3"
    _write(session / "targetname", TARGET)
    _write(session / "state", "LOGGED_IN")
    (session / "device/target3:0:0/3:0:0:0/block/sdc").mkdir(parents=True)
    connection = tmp_path / "class/iscsi_connection/connection3:0"
    _write(connection / "persistent_address", "198.18.0.50")
    _write(connection / "persistent_port", "3260")
    other = tmp_path / "class/iscsi_session/session4"
    _write(other / "targetname", "iqn.2001-01.com.example:someone-else")
    found = iscsi.sessions(tmp_path)
    assert list(found) == [(TARGET, "198.18.0.50:3260")]
    assert found[(TARGET, "198.18.0.50:3260")].devices == ("/dev/sdc",)
    assert found[(TARGET, "198.18.0.50:3260")].usable


# -- disks ----------------------------------------------------------------------------------------

LSBLK = """{"blockdevices": [
 {"name": "vda", "path": "%(vda)s", "size": 67108864, "type": "disk", "ro": false,
  "fstype": null, "mountpoint": null},
 {"name": "vdb", "path": "%(vdb)s", "size": 67108864, "type": "disk", "ro": false,
  "fstype": null, "mountpoint": null},
 {"name": "vdc", "path": "/dev/vdc", "size": 67108864, "type": "disk", "ro": false,
  "fstype": "ext4", "mountpoint": null},
 {"name": "vdd", "path": "/dev/vdd", "size": 67108864, "type": "disk", "ro": false,
  "fstype": null, "mountpoint": null, "children": [{"name": "vdd1"}]},
 {"name": "zram0", "path": "/dev/zram0", "size": 67108864, "type": "disk", "ro": false},
 {"name": "vde", "path": "/dev/vde", "size": 67108864, "type": "disk", "ro": false,
  "fstype": "LVM2_member", "mountpoint": null}
]}"""


async def test_only_zeroed_disks_without_signatures_count_as_empty(tmp_path, monkeypatch):
    blank, dirty = tmp_path / "vda", tmp_path / "vdb"
    for path in (blank, dirty):
        with open(path, "wb") as handle:
            handle.truncate(64 << 20)
    with open(dirty, "r+b") as handle:  # data with no signature blkid knows
        handle.seek((64 << 20) - 4096)
        handle.write(b"old data")

    async def run_tool(argv: list[str], timeout: float) -> str:
        if argv[0] == "lsblk":
            return LSBLK % {"vda": blank, "vdb": dirty}
        if argv[0] == "pvs":
            return '{"report": [{"pv": [{"pv_name": "/dev/vde", "vg_name": "netboot"}]}]}'
        if argv[0] == "blkid":
            raise ToolUnavailable(f"{' '.join(argv)} failed (2): ")
        raise AssertionError(argv)

    monkeypatch.setattr(lvm, "run_tool", run_tool)
    found = {Path(d.path).name: d for d in await lvm.disks()}
    assert found["vda"].state == "empty"
    assert (found["vdb"].state, found["vdb"].why) == (
        "foreign", "holds data (not zeros) with no signature")
    assert found["vdc"].state == "foreign" and "ext4" in found["vdc"].why
    assert found["vdd"].state == "foreign" and found["vdd"].why == "has partitions"
    assert found["vde"].state == "ours"
    assert "zram0" not in found


async def test_a_partial_volume_group_is_never_extended(monkeypatch):
    calls: list[list[str]] = []

    async def run_tool(argv: list[str], timeout: float) -> str:
        calls.append(argv)
        if argv[0] == "vgs":
            return ('{"report": [{"vg": [{"vg_name": "netboot", "vg_size": "100", '
                    '"vg_free": "50", "vg_attr": "wz-pn-"}]}]}')
        return ""

    monkeypatch.setattr(lvm, "run_tool", run_tool)
    group = await lvm.ensure_volume_group([lvm.Disk("/dev/vdb", 1 << 30, "empty")])
    assert group is not None and group["partial"]
    assert not [c for c in calls if c[0] in ("pvcreate", "vgextend", "vgcreate")]


# -- the storage role -----------------------------------------------------------------------------

class FakeStorage:
    """lvm and lio as the storage role sees them, recording what it asks for."""

    def __init__(self, monkeypatch, *, volumes: dict[str, dict[str, Any]] | None = None,
                 group: dict[str, Any] | None = None) -> None:
        self.volumes = volumes if volumes is not None else {}
        self.group = group
        self.calls: list[tuple[str, ...]] = []
        self.exports: list[list[lio.Export]] = []
        self.arrays: set[str] = set()
        for name in ("disks", "volume_group", "ensure_volume_group", "logical_volumes",
                     "create", "zero", "activate", "remove", "mark_zeroed", "carries_array"):
            monkeypatch.setattr(lvm, name, getattr(self, name))
        monkeypatch.setattr(lio, "apply", self.apply)

    async def disks(self):
        return [lvm.Disk("/dev/vda", 4 << 30, "empty" if self.group is None else "ours")]

    async def volume_group(self):
        return self.group

    async def ensure_volume_group(self, found):
        self.calls.append(("ensure_volume_group",))
        self.group = self.group or {"name": "netboot", "size": 4 << 30, "free": 4 << 30,
                                    "partial": False}
        return self.group

    async def logical_volumes(self):
        return {k: dict(v) for k, v in self.volumes.items()}

    async def create(self, name, size):
        self.calls.append(("create", name))
        self.volumes[name] = {"size": size, "tags": ["netboot"], "active": True}

    async def zero(self, name):
        self.calls.append(("zero", name))
        self.volumes[name]["tags"].append(lvm.READY_TAG)

    async def mark_zeroed(self, name):
        self.calls.append(("mark_zeroed", name))
        self.volumes[name]["tags"].append(lvm.READY_TAG)

    async def carries_array(self, name):
        return name in self.arrays

    async def activate(self, name):
        self.calls.append(("activate", name))

    async def remove(self, name):
        self.calls.append(("remove", name))
        del self.volumes[name]

    def apply(self, exports):
        self.exports.append(list(exports))
        return {e.target: {"state": "exported", "error": None, "sessions": []} for e in exports}


def _export(initiators=({"node": "52:54:00:fa:d0:01", "iqn": DOM0_IQN, "user": "node-1",
                         "secret": "s" * 24},)) -> dict[str, Any]:
    return {"volume": VID, "name": "v1", "lv": f"nb-{VID}", "size": 260 << 20,
            "volume_size": 256 << 20, "target": TARGET, "image": None,
            "initiators": list(initiators)}


async def _settle(role: storage.StorageRole, work: dict[str, Any]) -> dict[str, Any]:
    for _ in range(20):
        report = await role.reconcile(work)
        if not role.busy():
            return report
        await asyncio.sleep(0.01)
    raise AssertionError("the storage role never settled")


async def test_a_new_leg_is_created_zeroed_then_exported(monkeypatch):
    fake = FakeStorage(monkeypatch)
    role = storage.StorageRole()
    first = await role.reconcile({"exports": [_export()]})
    assert first["exports"][0]["state"] == "creating"
    report = await _settle(role, {"exports": [_export()]})
    assert report["exports"][0]["state"] == "exported"
    assert ("create", f"nb-{VID}") in fake.calls and ("zero", f"nb-{VID}") in fake.calls
    exported = fake.exports[-1]
    assert [(e.target, e.device, [i.iqn for i in e.initiators]) for e in exported] == [
        (TARGET, f"/dev/netboot/nb-{VID}", [DOM0_IQN])]
    # Repeating the same work changes nothing that is already right.
    fake.calls.clear()
    await role.reconcile({"exports": [_export()]})
    assert fake.calls == []  # nor are the disks scanned again: the legs are whole


async def test_at_most_two_legs_are_prepared_at_once_the_others_queued(monkeypatch):
    fake = FakeStorage(monkeypatch)
    release = asyncio.Event()
    running: list[str] = []

    async def zero(name):  # a slow zeroing, held until released
        running.append(name)
        await release.wait()
        fake.volumes[name]["tags"].append(lvm.READY_TAG)

    monkeypatch.setattr(lvm, "zero", zero)
    exports = [{**_export(), "volume": f"v{i}", "lv": f"nb-v{i}", "target": f"{TARGET}{i}"}
               for i in range(4)]
    role = storage.StorageRole()
    report = await role.reconcile({"exports": exports})
    await asyncio.sleep(0.05)
    assert len(running) == storage.PREPARE_AT_ONCE == 2
    report = await role.reconcile({"exports": exports})
    steps = sorted(e.get("step") for e in report["exports"])
    assert steps == ["queued", "queued", "zeroing", "zeroing"], report["exports"]
    release.set()
    report = await _settle(role, {"exports": exports})
    assert [e["state"] for e in report["exports"]] == ["exported"] * 4
    assert sorted(running) == [f"nb-v{i}" for i in range(4)]


async def test_revoked_access_is_applied_before_the_disk_scans(monkeypatch):
    fake = FakeStorage(monkeypatch, volumes={f"nb-{VID}": {
        "size": 260 << 20, "tags": ["netboot", lvm.READY_TAG], "active": True}},
        group={"name": "netboot", "size": 1 << 32, "free": 1 << 31, "partial": False})
    role = storage.StorageRole()
    await role.reconcile({"exports": [_export()]})
    fake.exports.clear()
    scanned_before_export = []

    async def disks():
        scanned_before_export.append(not fake.exports)
        return []
    monkeypatch.setattr(lvm, "disks", disks)
    await role.reconcile({"exports": [_export(initiators=())]})
    assert not any(scanned_before_export)
    assert fake.exports[0][0].initiators == ()


async def test_a_leg_holding_an_array_is_never_zeroed_again(monkeypatch):
    fake = FakeStorage(monkeypatch, volumes={f"nb-{VID}": {
        "size": 260 << 20, "tags": ["netboot"], "active": True}},
        group={"name": "netboot", "size": 1 << 32, "free": 1 << 31, "partial": False})
    fake.arrays.add(f"nb-{VID}")
    report = await _settle(storage.StorageRole(), {"exports": [_export()]})
    assert ("zero", f"nb-{VID}") not in fake.calls
    assert ("mark_zeroed", f"nb-{VID}") in fake.calls
    assert report["exports"][0]["state"] == "exported"


async def test_only_listed_legs_are_removed_and_strangers_are_reported(monkeypatch):
    group = {"name": "netboot", "size": 1 << 32, "free": 1 << 31, "partial": False}
    fake = FakeStorage(monkeypatch, group=group, volumes={
        "nb-aaaaaaaaaaaaaaaa": {"size": 1, "tags": [lvm.READY_TAG], "active": True},
        "nb-bbbbbbbbbbbbbbbb": {"size": 1, "tags": [lvm.READY_TAG], "active": True},
        "home": {"size": 1, "tags": [], "active": True}})
    report = await storage.StorageRole().reconcile({"exports": [], "remove": [
        {"volume": "aaaaaaaaaaaaaaaa", "lv": "nb-aaaaaaaaaaaaaaaa", "target": "t"}]})
    assert fake.calls == [("remove", "nb-aaaaaaaaaaaaaaaa")]
    assert report["removed"] == ["aaaaaaaaaaaaaaaa"]
    assert report["orphans"] == ["nb-bbbbbbbbbbbbbbbb"]
    assert fake.exports[-1] == []  # no export of ours is wanted: LIO drops them


async def test_no_empty_disk_means_an_error_not_a_guess(monkeypatch):
    fake = FakeStorage(monkeypatch)

    async def ensure(found):
        return None
    monkeypatch.setattr(lvm, "ensure_volume_group", ensure)
    report = await fake_reconcile(monkeypatch, fake)
    assert report["exports"][0]["state"] == "error"
    assert "no empty disk" in report["exports"][0]["error"]


async def fake_reconcile(monkeypatch, fake: FakeStorage) -> dict[str, Any]:
    return await storage.StorageRole().reconcile({"exports": [_export()]})


# -- the dom0 role --------------------------------------------------------------------------------

class FakeDom0:
    """iscsi and md as the dom0 role sees them: sessions, superblocks and arrays in memory."""

    def __init__(self, monkeypatch, *, superblocks: dict[str, str] | None = None) -> None:
        self.sessions: dict[tuple[str, str], iscsi.Session] = {}
        self.superblocks = superblocks or {}
        self.arrays: dict[str, md.Array] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.devices = {"198.18.0.50:3260": "/dev/sda", "198.18.0.51:3260": "/dev/sdb"}
        self.reachable = set(self.devices)
        monkeypatch.setattr(iscsi, "sessions", lambda: dict(self.sessions))
        monkeypatch.setattr(iscsi, "device_alive", lambda device: True)
        monkeypatch.setattr(md, "arrays", lambda: dict(self.arrays))
        for name in ("ensure_iface", "login", "logout"):
            monkeypatch.setattr(iscsi, name, getattr(self, name))
        for name in ("examine", "create", "assemble", "readd", "fail", "stop"):
            monkeypatch.setattr(md, name, getattr(self, f"md_{name}"))

    async def ensure_iface(self, initiator):
        self.calls.append(("iface", initiator))

    async def login(self, target, portal, user, secret):
        self.calls.append(("login", portal))
        if portal not in self.reachable:
            from nodeagent.errors import IscsiError
            raise IscsiError(f"login to {portal} failed")
        self.sessions[(target, portal)] = iscsi.Session(target, portal, "LOGGED_IN",
                                                        (self.devices[portal],))

    async def logout(self, target, portal):
        self.calls.append(("logout", portal))
        self.sessions.pop((target, portal), None)

    async def md_examine(self, device):
        return self.superblocks.get(device)

    def _array(self, name, devices, state="in_sync"):
        self.arrays[name] = md.Array(name, "/dev/md127", 2, 2 - len(devices), "idle", None,
                                     tuple(md.Member(d, state) for d in devices))

    async def md_create(self, name, size, devices):
        self.calls.append(("create", name, size, tuple(devices)))
        for device in devices:
            self.superblocks[device] = name
        self._array(name, devices)

    async def md_assemble(self, name, devices):
        self.calls.append(("assemble", name, tuple(devices)))
        self._array(name, devices)

    async def md_readd(self, name, device):
        self.calls.append(("readd", name, device))
        array = self.arrays[name]
        self._array(name, [*(m.device for m in array.members if m.device != device), device])

    async def md_fail(self, name, device):
        self.calls.append(("fail", name, device))

    async def md_stop(self, name):
        self.calls.append(("stop", name))
        del self.arrays[name]


def _attachment(create: bool) -> dict[str, Any]:
    return {"volume": VID, "name": "v1", "size": 256 << 20, "md_name": f"nb-{VID}",
            "device": f"/dev/md/nb-{VID}", "create": create, "user": "node-1",
            "secret": "s" * 24, "legs": LEGS}


def _work(*attachments: dict[str, Any]) -> dict[str, Any]:
    return {"initiator": DOM0_IQN, "attachments": list(attachments)}


async def test_a_new_volume_is_created_across_both_legs(monkeypatch):
    fake = FakeDom0(monkeypatch)
    role = dom0.Dom0Role()
    report = await role.reconcile(_work(_attachment(create=True)))
    assert ("create", f"nb-{VID}", 256 << 20, ("/dev/sda", "/dev/sdb")) in fake.calls
    entry = report["attachments"][0]
    assert (entry["state"], entry["created"], entry["device"]) == (
        "attached", True, f"/dev/md/nb-{VID}")
    assert [leg["state"] for leg in entry["legs"]] == ["active", "active"]
    assert not role.busy()
    fake.calls.clear()
    await role.reconcile(_work(_attachment(create=False)))
    assert fake.calls == []  # nothing to do twice


async def test_a_migration_s_target_logs_in_but_assembles_only_once_released(monkeypatch):
    """Standby (the source runs the array): both legs logged in, no array; then released:
    assembled from the legs' superblocks, never created."""
    fake = FakeDom0(monkeypatch, superblocks={"/dev/sda": f"nb-{VID}",
                                              "/dev/sdb": f"nb-{VID}"})
    role = dom0.Dom0Role()
    standby = {**_attachment(create=False), "standby": True}
    report = await role.reconcile(_work(standby))
    assert [c for c in fake.calls if c[0] == "login"] == [
        ("login", "198.18.0.50:3260"), ("login", "198.18.0.51:3260")]
    assert not fake.arrays and report["attachments"][0]["state"] == "standby"
    assert not role.busy()  # standby is settled: no fast retries
    report = await role.reconcile(_work({**standby, "standby": False}))
    assert ("assemble", f"nb-{VID}", ("/dev/sda", "/dev/sdb")) in fake.calls
    assert report["attachments"][0]["state"] == "attached"


async def test_a_migration_s_source_leaves_the_array_it_gave_up_down(monkeypatch):
    """Once the guest left and its array was stopped for the target, a pass with the same
    work (the server has not heard yet) does not assemble it again."""
    from nodeagent.roles.migration import Migrations
    fake = FakeDom0(monkeypatch, superblocks={"/dev/sda": f"nb-{VID}",
                                              "/dev/sdb": f"nb-{VID}"})
    moves = Migrations(None, exists=None, unpause=None)
    moves.given_up.add(f"nb-{VID}")

    async def no_guests(entries, devices_ready, network=None, incoming=()):
        return {"guests": [], "migrations": moves.report()}

    role = dom0.Dom0Role(types.SimpleNamespace(migrations=moves, reconcile=no_guests,
                                              destroy_unclaimed=nothing_unclaimed))
    monkeypatch.setattr(role._domains, "start", lambda: None)
    report = await role.reconcile(_work(_attachment(create=False)))
    assert not [c for c in fake.calls if c[0] in ("assemble", "create", "login")], fake.calls
    assert report["attachments"][0]["state"] == "released" and not fake.arrays


async def test_a_migration_s_target_resumes_on_the_source_s_own_word(monkeypatch):
    """The source's ``released`` (its certificate's identity, through the agent API) lets
    the target's task assemble the array from the standby legs, switch the guest's disk over
    and unpause it, before the config server says anything; anyone else's is refused, and
    passes meanwhile leave the array to the task."""
    from nodeagent.roles import blockmap
    from nodeagent.roles.migration import Migrations
    fake = FakeDom0(monkeypatch, superblocks={"/dev/sda": f"nb-{VID}",
                                              "/dev/sdb": f"nb-{VID}"})
    switched, unpaused = [], []

    async def linear(name):
        switched.append(name)

    async def unpause(domain):
        unpaused.append(domain)

    monkeypatch.setattr(blockmap, "linear", linear)
    moves = Migrations(None, exists=None, unpause=unpause)

    async def no_guests(entries, devices_ready, network=None, incoming=()):
        return {"guests": [], "migrations": moves.report()}

    role = dom0.Dom0Role(types.SimpleNamespace(migrations=moves, reconcile=no_guests,
                                              destroy_unclaimed=nothing_unclaimed))
    monkeypatch.setattr(role._domains, "start", lambda: None)
    standby = {**_attachment(create=False), "standby": True}
    await role.reconcile(_work(standby))
    source = "urn:netboot:node:52:54:00:fa:d0:01:boot"
    moves.states["m1"] = {"id": "m1", "side": "target", "state": "received",
                          "domain": "nb-web", "md": f"nb-{VID}", "port": 1, "error": None,
                          "peer": source}
    assert not moves.notify_released("m1", "urn:netboot:node:52:54:00:fa:d0:03:boot")
    assert not moves.notify_released("m2", source) and moves.resuming() == set()
    assert moves.notify_released("m1", source)
    assert moves.resuming() == {f"nb-{VID}"}
    report = await role.reconcile(_work(standby))  # the server has not heard yet
    assert not fake.arrays and report["attachments"][0]["state"] == "standby"
    await moves._resume("m1", {"device": f"/dev/md/nb-{VID}"})
    assert ("assemble", f"nb-{VID}", ("/dev/sda", "/dev/sdb")) in fake.calls
    assert switched == [f"nb-{VID}"] and unpaused == ["nb-web"]
    assert moves.states["m1"]["state"] == "running" and moves.resuming() == set()


async def test_an_initialized_volume_is_assembled_never_created(monkeypatch):
    fake = FakeDom0(monkeypatch, superblocks={"/dev/sdb": f"nb-{VID}"})
    fake.reachable = {"198.18.0.51:3260"}
    report = await dom0.Dom0Role().reconcile(_work(_attachment(create=False)))
    assert ("assemble", f"nb-{VID}", ("/dev/sdb",)) in fake.calls
    assert not [c for c in fake.calls if c[0] == "create"]
    entry = report["attachments"][0]
    assert entry["state"] == "degraded" and "198.18.0.50" in entry["error"]


async def test_a_foreign_superblock_stops_creation(monkeypatch):
    fake = FakeDom0(monkeypatch, superblocks={"/dev/sda": "nb-ffffffffffffffff"})
    report = await dom0.Dom0Role().reconcile(_work(_attachment(create=True)))
    assert not [c for c in fake.calls if c[0] == "create"]
    assert report["attachments"][0]["state"] == "error"
    assert "another array" in report["attachments"][0]["error"]


async def test_a_returning_leg_is_logged_in_again_and_re_added(monkeypatch):
    fake = FakeDom0(monkeypatch, superblocks={"/dev/sda": f"nb-{VID}", "/dev/sdb": f"nb-{VID}"})
    role = dom0.Dom0Role()
    await role.reconcile(_work(_attachment(create=False)))
    # storage-1 died: md failed its leg, iscsid gave up on the session.
    fake._array(f"nb-{VID}", ["/dev/sdb"])
    fake.sessions[(TARGET, "198.18.0.50:3260")] = iscsi.Session(
        TARGET, "198.18.0.50:3260", "FREE", ("/dev/sda",))
    fake.calls.clear()
    report = await role.reconcile(_work(_attachment(create=False)))
    assert ("logout", "198.18.0.50:3260") in fake.calls
    assert ("login", "198.18.0.50:3260") in fake.calls
    assert ("readd", f"nb-{VID}", "/dev/sda") in fake.calls
    assert report["attachments"][0]["state"] == "attached"


async def test_a_leaving_leg_is_let_go_then_taken_back(monkeypatch):
    fake = FakeDom0(monkeypatch)
    role = dom0.Dom0Role()
    await role.reconcile(_work(_attachment(create=True)))
    leaving = _attachment(create=False)
    leaving["legs"] = [{**LEGS[0], "leaving": True}, {**LEGS[1], "leaving": False}]
    fake.calls.clear()
    report = await role.reconcile(_work(leaving))
    assert fake.calls[:2] == [("fail", f"nb-{VID}", "/dev/sda"), ("logout", "198.18.0.50:3260")]
    assert ("login", "198.18.0.50:3260") not in fake.calls
    fake._array(f"nb-{VID}", ["/dev/sdb"])  # what md holds after the fail and remove
    report = await role.reconcile(_work(leaving))
    assert [leg["state"] for leg in report["attachments"][0]["legs"]] == ["missing", "active"]
    fake.calls.clear()
    report = await role.reconcile(_work(_attachment(create=False)))  # undrained
    assert ("login", "198.18.0.50:3260") in fake.calls
    assert ("readd", f"nb-{VID}", "/dev/sda") in fake.calls


async def test_the_last_in_sync_leg_is_never_let_go(monkeypatch):
    fake = FakeDom0(monkeypatch)
    role = dom0.Dom0Role()
    await role.reconcile(_work(_attachment(create=True)))
    fake._array(f"nb-{VID}", ["/dev/sda"])
    leaving = _attachment(create=False)
    leaving["legs"] = [{**LEGS[0], "leaving": True}, LEGS[1]]
    fake.reachable = {"198.18.0.50:3260"}
    fake.calls.clear()
    await role.reconcile(_work(leaving))
    assert not [c for c in fake.calls if c[0] == "fail" or c == ("logout", "198.18.0.50:3260")]


async def test_unwanted_arrays_stop_before_their_legs_log_out(monkeypatch):
    fake = FakeDom0(monkeypatch)
    role = dom0.Dom0Role()
    await role.reconcile(_work(_attachment(create=True)))
    fake.calls.clear()
    report = await role.reconcile(_work())
    assert fake.calls[0] == ("stop", f"nb-{VID}")
    assert {c for c in fake.calls[1:]} == {("logout", "198.18.0.50:3260"),
                                           ("logout", "198.18.0.51:3260")}
    assert report["detached"] == [VID]


async def test_an_open_array_is_not_torn_down(monkeypatch):
    fake = FakeDom0(monkeypatch)
    role = dom0.Dom0Role()
    await role.reconcile(_work(_attachment(create=True)))

    async def busy(name):
        raise MdError(f"mdadm: Cannot get exclusive access to /dev/md/{name}")
    monkeypatch.setattr(md, "stop", busy)
    fake.calls.clear()
    report = await role.reconcile(_work())
    assert not [c for c in fake.calls if c[0] == "logout"]
    assert report["detached"] == []


# -- the loop -------------------------------------------------------------------------------------

class CountingRole:
    name = "storage"

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def reconcile(self, work):
        self.seen.append(work)
        return {"pass": len(self.seen)}

    def busy(self) -> bool:
        return False

    def fingerprint(self) -> object:
        return None

    def snapshot(self, work):
        return {"snapshot": True}


async def test_the_loop_reconciles_each_answer_and_reports_it(monkeypatch):
    role = CountingRole()
    answers = [ServerError("server restarting"),
               {"generation": 4, "storage": {"exports": []}},
               {"generation": 5, "storage": {"exports": [1]}}]
    asked: list[int | None] = []
    reports: list[tuple[int | None, str, dict[str, Any]]] = []
    done = asyncio.Event()

    async def fetch(after, wait):
        asked.append(after)
        if not answers:
            done.set()
            await asyncio.sleep(3600)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def post(generation, role_name, report):
        reports.append((generation, role_name, report))

    monkeypatch.setattr(asyncio, "sleep", _fast_sleep(asyncio.sleep))
    task = asyncio.create_task(Reconciler(role, fetch, post).run())
    await asyncio.wait_for(done.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert asked == [None, None, 4, 5]
    assert role.seen == [{"exports": []}, {"exports": [1]}]
    assert reports == [(4, "storage", {"pass": 1}), (5, "storage", {"pass": 2})]


def _fast_sleep(real):
    async def sleep(delay, *args):
        await real(0 if delay < 3000 else delay)
    return sleep


def test_role_errors_belong_to_the_agent_hierarchy():
    from nodeagent.errors import AgentError, IscsiError, LioError, RoleError
    for error in (LvmError, MdError, IscsiError, LioError):
        assert issubclass(error, RoleError) and issubclass(error, AgentError)


async def test_a_leaving_leg_is_released_before_its_export_goes(monkeypatch):
    fake = FakeDom0(monkeypatch)
    role = dom0.Dom0Role()
    await role.reconcile(_work(_attachment(create=True)))
    leaving = _attachment(create=False)
    leaving["legs"] = [{**LEGS[0], "leaving": True}, LEGS[1]]
    fake.calls.clear()
    report = await role.reconcile(_work(leaving))
    assert fake.calls[:2] == [("fail", f"nb-{VID}", "/dev/sda"), ("logout", "198.18.0.50:3260")]
    assert ("login", "198.18.0.50:3260") not in fake.calls
    assert report["detached"] == []  # the volume stays attached, on one leg
    assert not role.busy()  # a leg left out on purpose is not something to repair
    # Undrained: the leg comes back and md takes it again.
    fake.superblocks["/dev/sda"] = f"nb-{VID}"
    fake._array(f"nb-{VID}", ["/dev/sdb"])
    report = await role.reconcile(_work(_attachment(create=False)))
    assert ("login", "198.18.0.50:3260") in fake.calls
    assert ("readd", f"nb-{VID}", "/dev/sda") in fake.calls
    assert report["attachments"][0]["state"] == "attached"


def test_an_image_is_copied_to_the_start_of_the_leg_and_padded(tmp_path):
    import hashlib
    image = tmp_path / "rootfs.img"
    image.write_bytes(b"\x53\xef" * 300_000)  # 600 000 bytes: not a whole MiB
    leg = tmp_path / "leg"
    leg.write_bytes(b"\xff" * (3 << 20))  # an old volume's data
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    written = lvm._copy(image.as_uri(), str(leg), image.stat().st_size, digest)
    assert written == 1 << 20
    data = leg.read_bytes()
    assert data[:600_000] == image.read_bytes()
    assert data[600_000:1 << 20] == bytes((1 << 20) - 600_000)
    # The rest is zeroed afterwards by blkdiscard from the returned offset.
    with pytest.raises(LvmError, match="sha256"):
        lvm._copy(image.as_uri(), str(leg), image.stat().st_size, "0" * 64)
    with pytest.raises(LvmError, match="got 600000 bytes of 700000"):
        lvm._copy(image.as_uri(), str(leg), 700_000, None)
    # Stopping: the copy ends at its next chunk, not after the whole image.
    import threading
    stop = threading.Event()
    stop.set()
    with pytest.raises(LvmError, match="the agent is stopping"):
        lvm._copy(image.as_uri(), str(leg), image.stat().st_size, digest, stop)


async def test_a_cancelled_fill_tells_its_copy_to_stop(monkeypatch):
    import asyncio
    import threading

    seen: list[threading.Event] = []
    release = threading.Event()

    def copy(url, path, size, sha256, stop):
        seen.append(stop)
        while not stop.wait(0.01) and not release.is_set():
            pass
        raise LvmError("stopped")

    monkeypatch.setattr(lvm, "_copy", copy)
    task = asyncio.create_task(lvm.fill("nb-x", "http://server/rootfs.img", 10))
    while not seen:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen[0].is_set()
    release.set()


async def test_a_change_on_the_node_runs_a_pass_without_waiting_for_the_server(monkeypatch):
    from nodeagent import roles

    class Watched(CountingRole):
        state = 0

        def fingerprint(self) -> object:
            return self.state

    role = Watched()
    monkeypatch.setattr(roles, "WATCH_PERIOD", 0.01)
    polls = 0

    async def fetch(after, wait):
        nonlocal polls
        polls += 1
        if polls == 1:
            return {"generation": 7, "storage": {"exports": ["x"]}}
        await asyncio.sleep(3600)  # the long poll: nothing new on the server

    reported = []

    async def post(generation, role_name, report):
        reported.append(report)

    task = asyncio.create_task(Reconciler(role, fetch, post).run())
    while polls < 2:
        await asyncio.sleep(0.01)
    role.state = 1  # a leg failed while the agent waits on the long poll
    for _ in range(200):
        if len(role.seen) >= 2:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert role.seen[:2] == [{"exports": ["x"]}, {"exports": ["x"]}]
    assert reported[:3] == [{"pass": 1}, {"snapshot": True}, {"pass": 2}]


async def test_a_dom0_with_guests_reports_them_after_its_volumes(monkeypatch, tmp_path):
    """The guests' part runs after the arrays: a guest on a volume assembled in this same
    pass is created in it (the device exists), and the report carries guests and Xen facts."""
    from test_agent_dom0_guests import FakeXl, entry, mapped

    from nodeagent.roles.dom0_guests import Guests

    FakeDom0(monkeypatch)
    xl = FakeXl()

    async def confirm(name, epoch):
        return True

    async def fetch(url, dest):
        from test_agent_dom0_guests import KERNEL, RAMDISK
        dest.write_bytes({"http://s/k": KERNEL, "http://s/r": RAMDISK}[url])

    async def load_rules(text, path):
        loaded.append(text)

    loaded = []
    role = dom0.Dom0Role(Guests(xl, confirm, fetch, config_dir=tmp_path / "cfg",
                                kernel_dir=tmp_path / "k", load_rules=load_rules,
                                usage=lambda domid: {}, disk=mapped))
    assembled = []
    monkeypatch.setattr(dom0.os.path, "exists",
                        lambda path: assembled.append(path) or path == f"/dev/md/nb-{VID}")
    guest = {**entry(), "device": f"/dev/md/nb-{VID}"}
    report = await role.reconcile({**_work(_attachment(create=True)), "guests": [guest]})
    assert report["attachments"][0]["state"] == "attached"
    assert xl.calls == [("create", "nb-web")] and report["guests"][0]["state"] == "blocked"
    assert len(loaded) == 1 and report["network"]["rules"] is True
    assert report["xen"]["free_memory_mib"] == 1400 and assembled == [f"/dev/md/nb-{VID}"]


async def test_a_target_that_cannot_prepare_reports_the_migration_failed():
    """An error before anything was received (here: the guest's kernel could not be had) is
    the migration's failure, so the server aborts it and the guest runs on at the source;
    the migration is not left preparing for ever."""
    from nodeagent.roles.migration import Migrations
    moves = Migrations(None, exists=None, unpause=None)

    async def prepare(entry):
        raise OSError(2, "No such file or directory", "/var/lib/nodeagent/kernels/x.part")

    entry = {"domain": "nb-web", "device": f"/dev/md/nb-{VID}",
             "migration": {"id": "m1", "peer": "urn:netboot:node:x:boot", "size": 1 << 30}}
    moves.step([entry], [], prepare)
    await asyncio.sleep(0)
    await moves._tasks["m1"]
    [line] = moves.report()
    assert line["state"] == "failed" and "x.part" in line["error"], line


async def nothing_unclaimed(entries):
    """``Guests.destroy_unclaimed`` of a dom0 running nothing but the work's guests."""
