"""Volumes in the SQLite registry: migration, desired-state writes, reports, the generation."""

from __future__ import annotations

import sqlite3

import pytest
from cloudtest import (
    DOM0,
    DOM0B,
    GIB,
    SN1,
    SN2,
    SN3,
    attachment,
    cloud,
    dom0_report,
    exported,
    old_schema,
    ready,
    storage_report,
)

from configserver.errors import (
    DuplicateVolume,
    InvalidReport,
    NoRoom,
    NotADom0,
    NotFound,
    TooFewStorageNodes,
    VolumeInUse,
)
from configserver.model import NodeSpec
from configserver.registry.schema import MIGRATIONS
from configserver.registry.sqlite import SqliteRegistry


@pytest.fixture
def registry(tmp_path):
    reg = SqliteRegistry(tmp_path / "registry.sqlite")
    yield reg
    reg.close()


def stages(registry, volume):
    return [e.stage for e in registry.volume_events(volume.id)]


def test_a_schema_3_registry_upgrades_and_keeps_its_nodes(tmp_path):
    path = tmp_path / "old.sqlite"
    db = old_schema(path, 3)
    db.commit()
    db.close()
    registry = SqliteRegistry(path)
    try:
        node = registry.lookup("52:54:00:00:00:01")
        assert node is not None and node.hostname == "old1" and node.ip == "198.18.0.9"
        assert registry.volumes() == [] and registry.cloud_generation() == 0
        version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
        assert version == len(MIGRATIONS) == 10
    finally:
        registry.close()


def test_create_places_on_the_two_with_most_room_and_bumps_the_generation(registry):
    cloud(registry, {SN1: 20 * GIB, SN2: 30 * GIB, SN3: 21 * GIB})
    before = registry.cloud_generation()
    volume, generation = registry.create_volume("db", 2 * GIB, None, None)
    assert generation == before + 1 == registry.cloud_generation()
    assert [g.node for g in volume.legs] == [SN2, SN3]
    assert volume.state == "creating" and len(volume.id) == 16
    assert registry.volume("db") == volume
    assert stages(registry, volume) == ["created", "placed"]
    # The legs placed count against their nodes until the VG reports them.
    second, _ = registry.create_volume("db2", 2 * GIB, None, None)
    assert [g.node for g in second.legs] == [SN2, SN1]


def test_refused_writes_store_nothing(registry):
    cloud(registry, {SN1: 3 * GIB, SN2: GIB})
    generation = registry.cloud_generation()
    with pytest.raises(NoRoom, match="does not fit"):
        registry.create_volume("big", 2 * GIB, None, None)
    registry.create_volume("small", 512 << 20, None, None)
    generation += 1
    with pytest.raises(DuplicateVolume):
        registry.create_volume("small", 512 << 20, None, None)
    with pytest.raises(NotFound):
        registry.attach_volume("small", "nosuch")
    with pytest.raises(NotADom0):
        registry.attach_volume("small", "sn1")
    with pytest.raises(NotFound):
        registry.delete_volume("nosuch")
    assert [v.name for v in registry.volumes()] == ["small"]
    assert registry.cloud_generation() == generation


def test_too_few_ready_storage_nodes(tmp_path, registry):
    ready(registry, SN1, "storage", "sn1", "198.18.0.51")
    registry.add_node(NodeSpec(mac=SN2, role="storage", hostname="sn2"))
    with pytest.raises(TooFewStorageNodes, match=r"1 is ready \(sn1\).*sn2 \(registered\)"):
        registry.create_volume("v", GIB, None, None)
    assert registry.volumes() == []


def test_one_dom0_at_a_time_and_no_delete_while_attached(registry):
    cloud(registry, dom0s=2)
    volume, _ = registry.create_volume("v", GIB, None, None)
    attached, generation = registry.attach_volume("v", "dom0-1")
    assert [a.node for a in attached.attachments] == [DOM0]
    # Again: nothing changes, no bump.
    assert registry.attach_volume("v", DOM0)[1] == generation
    with pytest.raises(VolumeInUse, match="detach it from dom0-1 first"):
        registry.attach_volume("v", "dom0-2")
    with pytest.raises(VolumeInUse, match="attached to dom0-1"):
        registry.delete_volume("v")
    detaching, _ = registry.detach_volume("v", "dom0-1")
    assert detaching.attachments[0].detaching
    with pytest.raises(VolumeInUse, match="still detaching"):
        registry.attach_volume("v", DOM0B)
    # The dom0 reports it no longer has it: the attachment goes, the ACL with it.
    registry.record_cloud_report(DOM0, dom0_report(detached=(volume.id,)))
    assert registry.volume("v").attachments == ()
    assert registry.attach_volume("v", DOM0B)[0].attachments[0].node == DOM0B
    assert stages(registry, volume)[-4:] == ["attach.requested", "detach.requested",
                                            "detached", "attach.requested"]


def test_reports_move_a_volume_through_its_life_recording_only_changes(registry):
    cloud(registry)
    volume, _ = registry.create_volume("v", GIB, None, None)
    registry.attach_volume("v", DOM0)
    g0 = registry.cloud_generation()
    registry.record_cloud_report(SN1, storage_report(40 * GIB, exported(volume.id)))
    half = registry.volume("v")
    assert half.state == "creating" and half.redundancy == "degraded"
    assert registry.cloud_generation() == g0 + 1  # a leg came: a dom0's work may change
    outcome = registry.record_cloud_report(SN2, storage_report(30 * GIB, exported(volume.id)))
    assert outcome.generation == g0 + 2
    both = registry.volume("v")
    assert both.state == "ready" and both.redundancy == "redundant"
    count = len(registry.volume_events(volume.id))
    again = registry.record_cloud_report(SN2, storage_report(30 * GIB, exported(volume.id)))
    assert again.changed == 0 and again.generation == g0 + 2
    assert len(registry.volume_events(volume.id)) == count

    registry.record_cloud_report(DOM0, dom0_report(attachment(volume.id, created=True)))
    up = registry.volume("v")
    assert up.initialized and up.attachments[0].state == "attached"
    assert up.attachments[0].device == f"/dev/md/nb-{volume.id}"
    assert registry.cloud_generation() == g0 + 3  # "create" turned false
    registry.record_cloud_report(DOM0, dom0_report(attachment(
        volume.id, "degraded", legs=((SN1, "active"), (SN2, "faulty")))))
    assert registry.volume("v").redundancy == "degraded"
    for percent in (1.0, 2.0, 12.5):
        registry.record_cloud_report(DOM0, dom0_report(attachment(
            volume.id, "resyncing", legs=((SN1, "active"), (SN2, "rebuilding")),
            sync={"action": "recover", "percent": percent})))
    assert registry.volume("v").redundancy == "resyncing"
    registry.record_cloud_report(DOM0, dom0_report(attachment(volume.id)))
    assert registry.volume("v").redundancy == "redundant"
    history = registry.volume_events(volume.id)
    assert [e.stage for e in history].count("resync") == 2  # 0-10%, then 10-20%
    redundancy = [(e.detail["from"], e.detail["to"]) for e in history
                  if e.stage == "redundancy"]
    assert redundancy == [("unknown", "degraded"), ("degraded", "redundant"),
                          ("redundant", "degraded"), ("degraded", "resyncing"),
                          ("resyncing", "redundant")]

    registry.detach_volume("v", DOM0)
    registry.record_cloud_report(DOM0, dom0_report(detached=(volume.id,)))
    deleting, _ = registry.delete_volume("v")
    assert deleting.state == "deleting"
    registry.record_cloud_report(SN1, storage_report(41 * GIB, removed=[volume.id]))
    assert registry.volume("v").leg(SN1).state == "removed"
    registry.record_cloud_report(SN2, storage_report(31 * GIB, removed=[volume.id]))
    assert registry.volume("v") is None and registry.volumes() == []


def test_a_leg_error_while_creating_is_the_volumes_error(registry):
    cloud(registry)
    volume, _ = registry.create_volume("v", GIB, None, None)
    failed = [{"volume": volume.id, "state": "error", "error": "lvcreate: no space",
               "sessions": [], "progress": None}]
    registry.record_cloud_report(SN1, storage_report(GIB, failed))
    broken = registry.volume("v")
    assert broken.state == "error" and "lvcreate: no space" in broken.error
    registry.record_cloud_report(SN1, storage_report(GIB, exported(volume.id)))
    registry.record_cloud_report(SN2, storage_report(GIB, exported(volume.id)))
    assert registry.volume("v").state == "ready" and registry.volume("v").error is None


def test_reports_about_other_nodes_volumes_are_ignored(registry):
    cloud(registry, {SN1: 50 * GIB, SN2: 40 * GIB, SN3: 10 * GIB})
    volume, _ = registry.create_volume("v", GIB, None, None)  # on sn1 and sn2
    outcome = registry.record_cloud_report(SN3, storage_report(GIB, exported(volume.id)))
    assert outcome.ignored == (volume.id,) and outcome.changed == 0
    outcome = registry.record_cloud_report(DOM0, dom0_report(attachment(volume.id)))
    assert outcome.ignored == (volume.id,)
    assert registry.volume("v") == volume


@pytest.mark.parametrize("report", [
    {"storage": {"exports": [{"volume": "nothex", "state": "exported"}]}},
    {"storage": {"exports": [{"volume": "0123456789abcdef", "state": "weird"}]}},
    {"storage": {"vg": {"name": "netboot", "size": -1, "free": 0}}},
    {"storage": {"disks": [{"path": "/dev/sda", "size": 1, "state": "mine"}]}},
    {"storage": []},
    {"dom0": {"attachments": [{"volume": "0123456789abcdef", "state": "attached",
                               "created": "yes"}]}},
    {"dom0": {"attachments": [{"volume": "0123456789abcdef", "state": "attached",
                               "legs": [{"node": "zz", "state": "active"}]}]}},
])
def test_malformed_reports_store_nothing(registry, report):
    cloud(registry)
    facts = registry.storage_facts(SN1)
    with pytest.raises(InvalidReport):
        registry.record_cloud_report(SN1, report)
    assert registry.storage_facts(SN1) == facts


def test_the_generation_survives_a_restart(tmp_path):
    path = tmp_path / "registry.sqlite"
    registry = SqliteRegistry(path)
    cloud(registry)
    volume, generation = registry.create_volume("v", GIB, None, None)
    registry.close()
    again = SqliteRegistry(path)
    try:
        assert again.cloud_generation() == generation
        assert again.volumes() == [volume]
    finally:
        again.close()
