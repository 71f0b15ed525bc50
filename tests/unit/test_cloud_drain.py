"""Draining nodes (planned maintenance): the flag and its migration, the refusals, placement,
the work (leaving legs, exports kept while a dom0 holds them), legs_held and the events."""

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

from configserver.cloud.drain import drain_status, legs_held
from configserver.cloud.work import node_work
from configserver.errors import NodeDrained, NotDrainable, NotFound, TooFewStorageNodes, VolumeInUse
from configserver.registry.schema import MIGRATIONS
from configserver.registry.sqlite import SqliteRegistry

KEY = b"k" * 32


@pytest.fixture
def registry(tmp_path):
    reg = SqliteRegistry(tmp_path / "registry.sqlite")
    cloud(reg, {SN1: 50 * GIB, SN2: 40 * GIB, SN3: 30 * GIB}, dom0s=2)
    yield reg
    reg.close()


def attached_volume(registry, name="db"):
    """A volume on sn1 and sn2, exported, attached to dom0-1 which holds both legs."""
    volume, _ = registry.create_volume(name, GIB, None, None)
    assert [g.node for g in volume.legs] == [SN1, SN2]
    for mac in (SN1, SN2):
        registry.record_cloud_report(mac, storage_report(10 * GIB, exported(volume.id)))
    registry.attach_volume(name, "dom0-1")
    registry.record_cloud_report(DOM0, dom0_report(attachment(volume.id, created=True)))
    return registry.volume(name)


def work(registry, mac):
    node = registry.lookup(mac)
    drained = {n.mac for n in registry.list_nodes() if n.drained is not None}
    return node_work(registry.cloud_generation(), node.role, mac, registry.volumes(), key=KEY,
                     images={}, portals={SN1: "198.18.0.51:3260", SN2: "198.18.0.52:3260"},
                     drained=drained)


def node_stages(registry, mac):
    return [e.stage for e in registry.events(mac)]


def volume_stages(registry, volume):
    return [e.stage for e in registry.volume_events(volume.id)]


def test_a_schema_4_registry_upgrades_keeping_nodes_and_volumes(tmp_path):
    path = tmp_path / "old.sqlite"
    db = old_schema(path, 4, state="ready")
    db.execute("INSERT INTO volumes (id, name, size, state, created, updated) VALUES "
               "('00112233445566ff','keep',1048576,'ready',1,1)")
    db.execute("INSERT INTO settings VALUES ('cloud_generation','7')")
    db.commit()
    db.close()
    registry = SqliteRegistry(path)
    try:
        node = registry.lookup("52:54:00:00:00:01")
        assert node.hostname == "old1" and node.drained is None
        assert node.to_json()["drained"] is False and node.to_json()["drained_since"] is None
        assert [v.name for v in registry.volumes()] == ["keep"]
        assert registry.cloud_generation() == 7
        version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
        assert version == len(MIGRATIONS)
        drained, generation = registry.drain_node("old1")
        assert drained.drained is not None and generation == 8
    finally:
        registry.close()


def test_drain_and_undrain_are_idempotent_and_bump_the_generation(registry):
    volume = attached_volume(registry)
    before = registry.cloud_generation()
    node, generation = registry.drain_node("sn1")
    assert generation == before + 1 == registry.cloud_generation()
    assert node.drained is not None and node.to_json()["drained"] is True
    assert node.to_json()["drained_since"] == node.drained
    again, generation = registry.drain_node(SN1)
    assert again.drained == node.drained and generation == before + 1
    assert node_stages(registry, SN1).count("node.drain") == 1
    assert volume_stages(registry, volume).count("leg.leaving") == 1
    back, generation = registry.undrain_node("sn1")
    assert back.drained is None and generation == before + 2
    assert registry.undrain_node("sn1")[1] == before + 2
    assert node_stages(registry, SN1).count("node.undrain") == 1
    assert volume_stages(registry, volume)[-1] == "leg.back"
    assert registry.undrain_node("sn3")[1] == before + 2  # never drained: nothing happens


def test_refusals(registry):
    attached_volume(registry)
    # A volume attached by hand is no instance's disk: a drain cannot move it live.
    with pytest.raises(VolumeInUse, match=r"attached that are no instance's disk there "
                                          r"\(db\): detach them first") as refused:
        registry.drain_node("dom0-1")
    assert refused.value.status == 409 and "db" in refused.value.message
    assert registry.lookup(DOM0).drained is None
    node, _ = registry.drain_node("dom0-2")  # nothing attached: just marked
    assert node.drained is not None
    registry.create_volume("other", GIB, None, None)
    with pytest.raises(NodeDrained, match="dom0-2 is drained") as refused:
        registry.attach_volume("other", "dom0-2")
    assert refused.value.status == 409
    with pytest.raises(NotFound):
        registry.drain_node("nosuch")


def test_pending_and_other_roles_are_refused(registry):
    from configserver.model import Role

    registry.add_role(Role("web", image="web"))
    ready(registry, "52:54:00:00:0e:01", "web", "web-1")
    with pytest.raises(NotDrainable, match="web node") as refused:
        registry.drain_node("web-1")
    assert refused.value.status == 409
    registry.discover("52:54:00:00:0e:02", {})
    registry.flush()
    with pytest.raises(NotDrainable, match="pending"):
        registry.drain_node("52:54:00:00:0e:02")


def test_placement_never_picks_a_drained_node(registry):
    registry.drain_node("sn1")
    volume, _ = registry.create_volume("a", GIB, None, None)
    assert {g.node for g in volume.legs} == {SN2, SN3}
    registry.drain_node("sn2")
    with pytest.raises(TooFewStorageNodes, match="drained: sn1, sn2") as refused:
        registry.create_volume("b", GIB, None, None)
    assert "undrain" in refused.value.hint


def test_the_work_of_a_drain_from_leaving_to_powered_off_and_back(registry):
    volume = attached_volume(registry)
    assert work(registry, SN1)["storage"]["drained"] is False
    assert [g["leaving"] for g in work(registry, DOM0)["dom0"]["attachments"][0]["legs"]] == [
        False, False]
    registry.drain_node("sn1")
    # The dom0 still gets both legs, sn1's flagged; sn1 still exports: the dom0 holds it.
    legs = work(registry, DOM0)["dom0"]["attachments"][0]["legs"]
    assert [(g["node"], g["leaving"]) for g in legs] == [(SN1, True), (SN2, False)]
    storage = work(registry, SN1)["storage"]
    assert storage["drained"] is True and [e["volume"] for e in storage["exports"]] == [
        volume.id]
    assert work(registry, SN2)["storage"]["drained"] is False
    assert drain_status(registry.lookup(SN1), registry.volumes())["legs_held"] == 1
    assert "node.drained" not in node_stages(registry, SN1)
    # The dom0 lets go of the leg: sn1's export leaves its work (the generation moves).
    before = registry.cloud_generation()
    outcome = registry.record_cloud_report(DOM0, dom0_report(attachment(
        volume.id, "degraded", legs=((SN1, "missing"), (SN2, "active")))))
    assert outcome.generation == before + 1
    assert work(registry, SN1)["storage"]["exports"] == []
    assert legs_held(registry.volumes(), SN1) == 0
    assert node_stages(registry, SN1).count("node.drained") == 1
    registry.record_cloud_report(SN1, storage_report(GIB, []))  # the export is gone
    shown = registry.volume("db")
    assert shown.redundancy == "degraded"
    assert [g["leaving"] for g in work(registry, DOM0)["dom0"]["attachments"][0]["legs"]] == [
        True, False]
    registry.record_cloud_report(DOM0, dom0_report(attachment(
        volume.id, "degraded", legs=((SN1, "missing"), (SN2, "active")))))
    assert node_stages(registry, SN1).count("node.drained") == 1  # once
    # Undrained: the export is back, the leg no longer leaving.
    registry.undrain_node("sn1")
    assert [e["volume"] for e in work(registry, SN1)["storage"]["exports"]] == [volume.id]
    assert work(registry, SN1)["storage"]["drained"] is False
    assert [g["leaving"] for g in work(registry, DOM0)["dom0"]["attachments"][0]["legs"]] == [
        False, False]


def test_an_unreported_attachment_holds_and_a_volume_attached_nowhere_does_not(registry):
    volume, _ = registry.create_volume("db", GIB, None, None)
    for mac in (SN1, SN2):
        registry.record_cloud_report(mac, storage_report(GIB, exported(volume.id)))
    registry.attach_volume("db", "dom0-1")  # the dom0 has not reported yet
    node, _ = registry.drain_node("sn1")
    assert drain_status(node, registry.volumes()) == {"requested": node.drained,
                                                      "legs_held": 1}
    assert len(work(registry, SN1)["storage"]["exports"]) == 1
    registry.detach_volume("db", "dom0-1", force=True)
    assert work(registry, SN1)["storage"]["exports"] == []
    assert node_stages(registry, SN1).count("node.drained") == 1
    assert drain_status(registry.lookup(DOM0B), registry.volumes()) is None
    assert drain_status(registry.lookup(SN2), registry.volumes()) is None


def test_a_storage_node_with_nothing_held_is_drained_at_once(registry):
    registry.drain_node("sn3")
    assert node_stages(registry, SN3)[-2:] == ["node.drain", "node.drained"]
