# ruff: noqa: F811 (the tests take the imported ``registry`` fixture by its name)
"""Failover of a lost dom0: its instances fenced at the storage first (every storage node
serving their disks confirms it dropped the dom0), then restarted on another dom0 with a new
epoch; nothing restarts while a storage node has not confirmed, and the reason says so."""

from __future__ import annotations

import pytest
from cloudtest import DOM0, DOM0B, GIB, SN1, SN2
from cloudtest import storage_report as storage
from test_cloud_migration import XEN, registry, report, running  # noqa: F401

from configserver.cloud.failover import (
    ExportSeen,
    Failover,
    confirm,
    from_json,
    migration_fate,
    waiting_reason,
)
from configserver.cloud.guestwork import guest_work
from configserver.cloud.instances import Claim, Desired, Instance, InstanceNic, holds
from configserver.cloud.migration import RELEASED, SENDING, new_migration
from configserver.cloud.model import MIB, initiator_iqn
from configserver.cloud.work import storage_work
from configserver.config import from_mapping
from configserver.errors import ConfigError, Conflict, VolumeInUse
from configserver.model import NodeState

KEY = b"k" * 32


def web_on_dom0_1(registry, memory=256 * MIB) -> Instance:
    volume, _ = registry.create_volume("web-disk", 2 * GIB, None, None)
    for node in (SN1, SN2):
        registry.record_cloud_report(node, storage(40 * GIB, _export(volume.id, DOM0)))
    registry.create_instance(Instance(
        id="0123456789abcdef", name="web", memory=memory, vcpus=1, volume=volume.id,
        nics=(InstanceNic("00:16:3e:00:00:01", "198.18.0.100"),)))
    registry.start_instance("web", DOM0)
    registry.record_cloud_report(DOM0, report(volume.id, guests=[running("0123456789abcdef",
                                                                         1)]))
    registry.record_cloud_report(DOM0B, report(volume.id, state=None))
    assert registry.instance("web").actual == "running"
    return registry.instance("web")


def _export(volume_id, *sessions, state="exported", error=None):
    return [{"volume": volume_id, "state": state, "error": error,
             "sessions": [initiator_iqn(m) for m in sessions], "progress": None}]


def lose(registry, mac=DOM0):
    registry.set_state(mac, NodeState.LOST, "missed heartbeats")
    return registry.fail_over_lost()


def confirm_from(registry, node, volume_id, *sessions, seen=None):
    registry.record_cloud_report(node, storage(40 * GIB, _export(volume_id, *sessions)),
                                 registry.cloud_generation() if seen is None else seen)


def test_a_lost_dom0_is_cut_off_from_the_disk_before_anything_restarts(registry):
    web = web_on_dom0_1(registry)
    fenced_at = lose(registry)
    assert fenced_at == registry.cloud_generation()
    now = registry.instance("web")
    assert now.actual == "unknown" and now.claim == Claim(DOM0, 1)  # nowhere else yet
    assert now.failover is not None and now.failover.generation == fenced_at
    assert set(now.failover.legs) == {SN1, SN2} and now.failover.confirmed == ()
    assert "waiting for storage nodes sn1, sn2 to confirm" in now.failover.reason
    # The storage nodes' work no longer lets dom0-1 in; dom0-1, were it back, runs nothing.
    volume = registry.volume("web-disk")
    assert volume.attachment(DOM0) is None
    for node in (SN1, SN2):
        (export,) = storage_work([volume], node, key=KEY, images={})["exports"]
        assert export["initiators"] == []
    assert guest_work([now], DOM0, volumes={}, boots={}, server_url="http://x") == []
    assert not holds(now, DOM0, 1)  # the claim check refuses an xl create there
    # Back before the restart, its report of the old guest moves nothing.
    registry.record_cloud_report(DOM0, report(web.volume, state=None,
                                              guests=[running(web.id, 1)]))
    assert registry.instance("web").actual == "unknown"
    assert lose(registry) is None  # fenced once: a second sweep changes nothing
    stages = [e["stage"] for e in registry.instance_events(web.id)]
    assert "failover.fencing" in stages


def test_it_restarts_elsewhere_only_once_every_storage_node_confirmed(registry):
    web = web_on_dom0_1(registry)
    fenced_at = lose(registry)
    confirm_from(registry, SN1, web.volume, seen=fenced_at - 1)  # older work: not a proof
    assert registry.instance("web").failover.confirmed == ()
    confirm_from(registry, SN1, web.volume)
    now = registry.instance("web")
    assert now.failover.confirmed == (SN1,) and now.claim == Claim(DOM0, 1)
    assert "waiting for storage node sn2 to confirm" in now.failover.reason
    registry.record_cloud_report(SN2, storage(40 * GIB, [{
        "volume": web.volume, "state": "exported", "error": None, "sessions": [],
        "acls": [initiator_iqn(DOM0)], "progress": None}]), registry.cloud_generation())
    assert registry.instance("web").failover.reason == "storage node sn2 still lets dom0-1 in"
    confirm_from(registry, SN2, web.volume, DOM0)  # LIO still shows dom0-1's session
    now = registry.instance("web")
    assert now.failover.confirmed == (SN1,)
    assert now.failover.reason == "storage node sn2 still has a session of dom0-1"
    confirm_from(registry, SN2, web.volume)
    now = registry.instance("web")
    assert now.failover is None and now.claim == Claim(DOM0B, 2)
    assert now.desired == Desired.RUNNING
    assert registry.volume("web-disk").attachment(DOM0B) is not None
    assert registry.volume("web-disk").attachment(DOM0) is None
    assert holds(now, DOM0B, 2) and not holds(now, DOM0, 1)
    (entry,) = guest_work([now], DOM0B, volumes={}, boots={}, server_url="http://x")
    assert entry["epoch"] == 2
    restarted = [e for e in registry.instance_events(web.id)
                 if e["stage"] == "failover.restarted"]
    assert restarted and restarted[0]["detail"]["lost"] == DOM0
    # dom0-2 reports it running: the map is right, the old epoch's report moves nothing.
    registry.record_cloud_report(DOM0B, report(web.volume, guests=[running(web.id, 2)]))
    registry.record_cloud_report(DOM0, report(web.volume, state=None,
                                              guests=[running(web.id, 1)]))
    assert registry.instance("web").actual == "running"
    assert registry.instance("web").claim == Claim(DOM0B, 2)


def test_a_storage_node_that_cannot_confirm_keeps_it_unknown_saying_why(registry):
    web = web_on_dom0_1(registry)
    registry.set_state(SN2, NodeState.LOST, "missed heartbeats")
    lose(registry)
    confirm_from(registry, SN1, web.volume)
    now = registry.instance("web")
    assert now.actual == "unknown" and now.claim == Claim(DOM0, 1)
    assert "waiting for storage node sn2 (lost) to confirm; nothing restarts" in \
        now.failover.reason
    registry.record_cloud_report(SN2, storage(40 * GIB, _export(web.volume, state="error",
                                                                error="LIO: busy")),
                                 registry.cloud_generation())
    assert registry.instance("web").failover.reason == \
        "storage node sn2 could not apply the fence: LIO: busy"
    assert registry.instance("web").claim == Claim(DOM0, 1)


def test_no_room_elsewhere_waits_with_the_reason_and_restarts_when_room_comes(registry):
    web = web_on_dom0_1(registry, memory=2048 * MIB)  # dom0-2 has 1400 MiB free
    lose(registry)
    confirm_from(registry, SN1, web.volume)
    confirm_from(registry, SN2, web.volume)
    now = registry.instance("web")
    assert now.claim == Claim(DOM0, 1) and now.failover.fenced
    assert now.failover.reason.startswith("fenced, but not restarted yet: ")
    assert "dom0-2" in now.failover.reason
    registry.record_cloud_report(DOM0B, report(web.volume, state=None,
                                               xen={**XEN, "free_memory_mib": 4096}))
    assert registry.instance("web").claim == Claim(DOM0B, 2)


def test_a_stopped_instance_of_a_lost_dom0_gives_its_claim_back_once_fenced(registry):
    web = web_on_dom0_1(registry)
    registry.stop_instance("web")  # dom0-1 dies before it reports the guest gone
    lose(registry)
    confirm_from(registry, SN1, web.volume)
    confirm_from(registry, SN2, web.volume)
    now = registry.instance("web")
    assert now.claim is None and now.failover is None and now.actual == "stopped"
    assert registry.volume("web-disk").attachments == ()


def test_a_migration_under_way_when_a_side_is_lost(registry):
    web = web_on_dom0_1(registry)
    registry.migrate_instance("web", "dom0-2")
    # The target, before the source released: the guest stays where it runs.
    assert lose(registry, DOM0B) == registry.cloud_generation()  # the long polls wake
    now = registry.instance("web")
    assert now.migration is None and now.failover is None and now.claim == Claim(DOM0, 1)
    assert registry.volume("web-disk").attachment(DOM0B) is None
    assert "migrate.failed" in [e["stage"] for e in registry.instance_events(web.id)]


def test_a_source_lost_mid_migration_is_fenced_and_the_target_let_go(registry):
    web = web_on_dom0_1(registry)
    registry.migrate_instance("web", "dom0-2")
    assert registry.volume("web-disk").attachment(DOM0B) is not None  # standby
    lose(registry, DOM0)
    now = registry.instance("web")
    assert now.migration is None and now.failover.source == DOM0
    assert registry.volume("web-disk").attachments == ()  # neither dom0 reaches the disk
    confirm_from(registry, SN1, web.volume)
    confirm_from(registry, SN2, web.volume)
    now = registry.instance("web")
    assert now.claim.node == DOM0B and now.claim.epoch > 2  # past the migration's epoch too
    assert registry.volume("web-disk").attachment(DOM0B) is not None


def test_nothing_gives_the_disk_back_to_the_lost_dom0_while_it_fails_over(registry):
    web_on_dom0_1(registry)
    lose(registry)
    with pytest.raises(Conflict, match="is being failed over"):
        registry.start_instance("web")  # it would attach the disk to its claim's dom0
    with pytest.raises(Conflict, match="dom0-1 is lost"):
        registry.attach_volume("web-disk", "dom0-1")
    registry.set_state(DOM0, NodeState.READY, "heartbeat")  # back, still fenced
    with pytest.raises(VolumeInUse, match="being failed over"):
        registry.attach_volume("web-disk", "dom0-1")
    assert registry.volume("web-disk").attachments == ()


def test_a_source_lost_after_the_release_loses_its_detaching_access(registry):
    web = web_on_dom0_1(registry)
    step, _ = registry.migrate_instance("web", "dom0-2")
    moving = step.migration
    registry.record_cloud_report(DOM0B, report(web.volume, state="standby", moves=[
        {"id": moving.id, "side": "target", "state": "listening", "port": 40100}]))
    registry.record_cloud_report(DOM0, report(web.volume, state="released", moves=[
        {"id": moving.id, "side": "source", "state": "released"}]))
    assert registry.volume("web-disk").attachment(DOM0).detaching
    lose(registry, DOM0)  # the target finishes the move; the source keeps no access
    assert registry.volume("web-disk").attachment(DOM0) is None
    now = registry.instance("web")
    assert now.failover is None and now.migration.phase == RELEASED


def test_the_fate_of_a_migration_by_phase():
    base = Instance(id="a" * 16, name="web", memory=256 * MIB, vcpus=1, volume="v",
                    desired=Desired.RUNNING, claim=Claim(DOM0, 1), epoch=2)
    for phase, lost, fence, abort in (
            (SENDING, DOM0B, False, True), (RELEASED, DOM0B, True, True),
            (SENDING, DOM0, True, True)):
        moving = base.__class__(**{**base.__dict__, "migration": _phase(phase)})
        fate = migration_fate(moving, lost)
        assert (fate.fence, fate.abort) == (fence, abort), (phase, lost)
    released = base.__class__(**{**base.__dict__, "migration": _phase(RELEASED)})
    assert migration_fate(released, DOM0) is None  # the target completes it
    assert migration_fate(base, DOM0B) is None
    assert migration_fate(base, DOM0) is not None


def _phase(phase):
    from dataclasses import replace

    return replace(new_migration(DOM0, DOM0B, 2, 1.0), phase=phase)


def test_confirmations_need_new_enough_work_and_no_session():
    record = Failover(DOM0, 1.0, 10, (SN1, SN2))
    labels = {DOM0: "dom0-1", SN1: "sn1", SN2: "sn2"}
    clean = {"v": ExportSeen("exported", None, ())}

    def seen(node, generation, exports, base=record):
        return confirm(base, node, generation, exports, volume="v", labels=labels)

    assert seen(SN1, 9, clean) == record
    assert seen(SN1, None, clean) == record
    assert seen(SN1, 10, clean).confirmed == (SN1,)
    assert seen(SN1, 12, {}).confirmed == (SN1,)  # not exported at all: nothing to reach
    assert seen("other", 12, {}) == record
    held = {"v": ExportSeen("exported", None, (initiator_iqn(DOM0),))}
    assert seen(SN1, 12, held).confirmed == ()
    let_in = {"v": ExportSeen("exported", None, (), (initiator_iqn(DOM0B), initiator_iqn(DOM0)))}
    assert seen(SN1, 12, let_in).reason == "storage node sn1 still lets dom0-1 in"
    others = {"v": ExportSeen("exported", None, (), (initiator_iqn(DOM0B),))}
    assert seen(SN1, 12, others).confirmed == (SN1,)
    both = seen(SN2, 11, clean, base=seen(SN1, 10, clean))
    assert both.fenced and waiting_reason(both, labels) == ""
    assert from_json(both.to_json()) == both and from_json(None) is None


def test_self_fencing_follows_lost_after_and_failover():
    assert from_mapping({}).self_fence_after == 60.0
    assert from_mapping({"lost_after": 30}).self_fence_after == 20.0
    assert from_mapping({"cloud": {"self_fence_after": 45}}).self_fence_after == 45.0
    assert from_mapping({"cloud": {"self_fence_after": 0}}).self_fence_after is None
    assert from_mapping({"cloud": {"failover": False}}).self_fence_after is None
    for wrong, says in ((90, "below lost_after (90 s)"), (120, "below lost_after"),
                        (-1, "below lost_after"), (20, "two heartbeat intervals (30 s)")):
        with pytest.raises(ConfigError) as refused:
            from_mapping({"cloud": {"self_fence_after": wrong}})
        assert says in refused.value.message, wrong
