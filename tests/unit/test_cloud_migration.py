"""Live migration in the control plane: the checks of a request, the phases driven by the two
dom0s' reports, the guest map moved only at the end, and what each dom0's work says."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cloudtest import DOM0, DOM0B, GIB, SN1, SN2, attachment, cloud, dom0_report, exported
from cloudtest import storage_report as storage

from configserver.cloud.guestwork import GuestBoot, Peer, guest_work, incoming_work
from configserver.cloud.instances import Claim, Instance, InstanceNic
from configserver.cloud.migration import MigrationReport, advance, new_migration, parse_reports
from configserver.cloud.model import MIB
from configserver.cloud.work import dom0_work
from configserver.errors import InvalidReport, MigrationRefused
from configserver.registry.sqlite import SqliteRegistry

XEN = {"free_memory_mib": 1400, "hap": False, "version": "4.17.5"}


def report(volume_id, *, state="attached", guests=(), moves=(), xen=XEN):
    body = dom0_report(attachment(volume_id, state) if state else None)
    if not state:
        body["dom0"]["attachments"] = []
    body["dom0"].update(xen=xen, guests=list(guests), migrations=list(moves))
    return body


def running(instance_id, epoch):
    return {"id": instance_id, "domain": "nb-web", "epoch": epoch, "state": "running",
            "domid": 3, "cpu_seconds": 1.0}


@pytest.fixture
def registry(tmp_path):
    made = SqliteRegistry(tmp_path / "registry.sqlite")
    cloud(made, dom0s=2)
    yield made
    made.close()


def running_web(registry) -> tuple[Instance, str]:
    volume, _ = registry.create_volume("web-disk", 2 * GIB, None, None)
    for node in (SN1, SN2):
        registry.record_cloud_report(node, storage(40 * GIB, exported(volume.id)))
    web = Instance(id="0123456789abcdef", name="web", memory=256 * MIB, vcpus=1,
                   volume=volume.id, nics=(InstanceNic("00:16:3e:00:00:01", "198.18.0.100"),))
    registry.create_instance(web)
    started, _ = registry.start_instance("web", DOM0)
    registry.record_cloud_report(DOM0, report(volume.id, guests=[running(web.id, 1)]))
    registry.record_cloud_report(DOM0B, report(volume.id, state=None))
    assert registry.instance("web").actual == "running"
    return started, volume.id


def test_a_migration_moves_the_map_only_once_both_sides_are_done(registry):
    web, vid = running_web(registry)
    moving, _ = registry.migrate_instance("web", "dom0-2")
    step = moving.migration
    assert (step.source, step.target, step.epoch, step.phase) == (DOM0, DOM0B, 2, "preparing")
    assert moving.claim == Claim(DOM0, 1)  # the claim stays with the source meanwhile
    assert sorted(a.node for a in registry.volume("web-disk").attachments) == [DOM0, DOM0B]
    with pytest.raises(MigrationRefused, match="already moving"):
        registry.migrate_instance("web", "dom0-2")

    # The target: legs logged in (standby), receiver listening.
    registry.record_cloud_report(DOM0B, report(vid, state="standby", moves=[
        {"id": step.id, "side": "target", "state": "listening", "port": 40123}]))
    now = registry.instance("web")
    assert now.migration.phase == "sending" and now.migration.port == 40123
    # The target's report did not touch the legs' states the source reports.
    assert {g.member for g in registry.volume("web-disk").legs} == {"active"}

    # The source sent it and released the array; its attachment goes, in order.
    registry.record_cloud_report(DOM0, report(vid, state="released", moves=[
        {"id": step.id, "side": "source", "state": "released"}]))
    now = registry.instance("web")
    assert now.migration.phase == "released" and now.claim == Claim(DOM0, 1)
    assert registry.volume("web-disk").attachment(DOM0).detaching

    # The target runs it: the claim moves, with the reserved epoch.
    registry.record_cloud_report(DOM0B, report(vid, moves=[
        {"id": step.id, "side": "target", "state": "running"}],
        guests=[running(web.id, 2)]))
    done = registry.instance("web")
    assert done.migration is None and done.claim == Claim(DOM0B, 2)
    assert done.actual == "running" and done.epoch == 2
    stages = [e["stage"] for e in registry.instance_events(web.id)]
    assert stages[-4:] == ["migrate.requested", "migrate.sending", "migrate.released",
                           "migrate.done"], stages
    registry.record_cloud_report(DOM0, report(vid, state=None) | {})
    assert [a.node for a in registry.volume("web-disk").attachments] == [DOM0B]


def test_a_failed_send_leaves_the_guest_where_it_was(registry):
    web, vid = running_web(registry)
    moving, _ = registry.migrate_instance("web")  # the scheduler's pick: the other dom0
    step = moving.migration
    assert step.target == DOM0B
    registry.record_cloud_report(DOM0B, report(vid, state="standby", moves=[
        {"id": step.id, "side": "target", "state": "listening", "port": 40123}]))
    registry.record_cloud_report(DOM0, report(vid, guests=[running(web.id, 1)], moves=[
        {"id": step.id, "side": "source", "state": "failed", "error": "connection reset"}]))
    after = registry.instance("web")
    assert after.migration is None and after.claim == Claim(DOM0, 1)
    assert [a.node for a in registry.volume("web-disk").attachments] == [DOM0]
    [failed] = [e for e in registry.instance_events(web.id) if e["stage"] == "migrate.failed"]
    assert "source: connection reset" in failed["detail"]["error"]
    # A late report of the aborted migration changes nothing.
    registry.record_cloud_report(DOM0B, report(vid, state=None, moves=[
        {"id": step.id, "side": "target", "state": "running"}]))
    assert registry.instance("web").claim == Claim(DOM0, 1)


def test_refusals_say_why_and_change_nothing(registry):
    web, vid = running_web(registry)
    with pytest.raises(MigrationRefused, match="runs on dom0-1 already"):
        registry.migrate_instance("web", "dom0-1")
    # The target short of memory.
    registry.record_cloud_report(DOM0B, report(vid, state=None,
                                               xen={**XEN, "free_memory_mib": 100}))
    with pytest.raises(MigrationRefused, match="cannot move: no dom0 can take 256 MiB"):
        registry.migrate_instance("web", "dom0-2")
    # Another Xen.
    registry.record_cloud_report(DOM0B, report(vid, state=None, xen={**XEN,
                                                                     "version": "4.20.1"}))
    with pytest.raises(MigrationRefused, match=r"runs Xen 4\.17\.5, dom0-2 4\.20\.1"):
        registry.migrate_instance("web", "dom0-2")
    registry.record_cloud_report(DOM0B, report(vid, state=None))
    # The disk degraded past safety: no leg both exported and in sync.
    registry.record_cloud_report(DOM0, report(vid, guests=[running(web.id, 1)]) | {
        "dom0": {**report(vid, guests=[running(web.id, 1)])["dom0"], "attachments": [
            attachment(vid, "degraded", legs=((SN1, "faulty"), (SN2, "missing")))]}})
    with pytest.raises(MigrationRefused, match="no leg that is both exported and in sync"):
        registry.migrate_instance("web", "dom0-2")
    assert registry.instance("web").migration is None
    assert [a.node for a in registry.volume("web-disk").attachments] == [DOM0]
    registry.stop_instance("web")
    with pytest.raises(MigrationRefused, match="is not running"):
        registry.migrate_instance("web", "dom0-2")


def test_each_dom0_s_work_during_a_migration():
    from configserver.cloud.model import Attachment, Leg, Volume, VolumeState
    volume = Volume(id="fedcba9876543210", name="web-disk", size=2 * GIB,
                    state=VolumeState.READY, initialized=True,
                    legs=(Leg(SN1, "exported", member="active"),
                          Leg(SN2, "exported", member="active")),
                    attachments=(Attachment(DOM0, "attached"), Attachment(DOM0B, "standby")))
    web = Instance(id="0123456789abcdef", name="web", memory=256 * MIB, vcpus=1,
                   volume=volume.id, claim=Claim(DOM0, 1), epoch=2, actual="running",
                   desired="running", nics=(InstanceNic("00:16:3e:00:00:01", "198.18.0.100"),),
                   image="guest", migration=new_migration(DOM0, DOM0B, 2, 5.0))
    boots = {"guest": GuestBoot("http://s/k", "a" * 64, "http://s/r", "b" * 64, "ro")}
    peers = {DOM0: Peer("urn:netboot:node:a:1", "198.18.0.10", 9898),
             DOM0B: Peer("urn:netboot:node:b:2", "198.18.0.11", 9898)}
    kwargs = {"volumes": {volume.id: volume}, "boots": boots, "server_url": "http://s",
              "peers": peers}
    # Preparing: the source runs it as before, the target prepares, its legs in standby.
    [entry] = guest_work([web], DOM0, **kwargs)
    assert "migrate" not in entry and entry["epoch"] == 1
    [coming] = incoming_work([web], DOM0B, **kwargs)
    assert coming["epoch"] == 2 and coming["migration"] == {
        "id": web.migration.id, "peer": "urn:netboot:node:a:1", "size": 2 * GIB,
        "released": False}
    assert guest_work([web], DOM0B, **kwargs) == []
    [standby] = dom0_work([volume], DOM0B, key=b"k", portals={}, standby={volume.id})[
        "attachments"]
    assert standby["standby"] is True and standby["create"] is False
    # Sending: the source learns where to.
    sending = replace(web, migration=replace(web.migration, phase="sending", port=40123))
    [entry] = guest_work([sending], DOM0, **kwargs)
    assert entry["migrate"] == {"id": web.migration.id, "address": "198.18.0.11",
                                "port": 40123, "peer": "urn:netboot:node:b:2",
                                "api_port": 9898}
    # Released: the source no longer has it; the target resumes it.
    released = replace(web, migration=replace(web.migration, phase="released", port=40123))
    assert guest_work([released], DOM0, **kwargs) == []
    assert incoming_work([released], DOM0B, **kwargs)[0]["migration"]["released"] is True


def test_reports_are_checked_and_only_the_right_side_advances_a_phase():
    step = new_migration(DOM0, DOM0B, 2, 1.0)
    with pytest.raises(InvalidReport):
        parse_reports([{"id": step.id, "side": "source", "state": "listening"}])
    with pytest.raises(InvalidReport):
        parse_reports([{"id": step.id, "side": "target", "state": "listening", "port": 0}])
    listening = MigrationReport(step.id, "target", "listening", 4000)
    assert advance(step, DOM0, listening, 2.0).migration == step  # not the target
    assert advance(step, DOM0B, listening, 2.0).migration.phase == "sending"
    # The source cannot release what it has not been sending; a running target that was
    # never released is no completion.
    assert advance(step, DOM0, MigrationReport(step.id, "source", "released"), 2.0
                   ).migration == step
    assert not advance(step, DOM0B, MigrationReport(step.id, "target", "running"), 2.0
                       ).completed
    # A target failure after the release is no abort: the guest is there, paused.
    released = replace(step, phase="released")
    outcome = advance(released, DOM0B, MigrationReport(step.id, "target", "failed"), 3.0)
    assert outcome.migration == released and outcome.aborted is None
