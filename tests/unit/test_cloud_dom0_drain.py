# ruff: noqa: F811 (the tests take the imported ``registry`` fixture by its name)
"""Draining a dom0: its instances migrate away live, a limited number at a time, the next one
as soon as one arrived; one that keeps failing is left running and named; the dom0 is drained
once it holds no claim."""

from __future__ import annotations

import argparse

import pytest
from cloudtest import DOM0, DOM0B, GIB, SN1, SN2, attachment, dom0_report, exported
from cloudtest import storage_report as storage
from test_cloud_migration import XEN, registry  # noqa: F401 (the fixture: 2 dom0s, 2 storage)

from configserver.cli.drain import cmd_drain, drain_line
from configserver.cloud.drain import next_moves, parallel
from configserver.cloud.instances import Claim, Instance, InstanceNic
from configserver.cloud.model import MIB
from configserver.errors import Conflict, InvalidRequest, VolumeInUse

NAMES = ("app", "db", "web")


def says(registry, mac, disks, guests=(), moves=(), *, xen=XEN):
    """Dom0 ``mac`` reports ``disks`` (volume id -> state), its running ``guests``
    ((instance, epoch)) and its side of migrations."""
    body = dom0_report(*(attachment(vid, state) for vid, state in disks.items()))
    body["dom0"].update(xen=xen, migrations=list(moves), guests=[
        {"id": i.id, "domain": f"nb-{i.name}", "epoch": epoch, "state": "running",
         "domid": n + 1, "cpu_seconds": 1.0} for n, (i, epoch) in enumerate(guests)])
    registry.record_cloud_report(mac, body)


def three_on_dom0_1(registry) -> dict[str, Instance]:
    made = {}
    for n, name in enumerate(NAMES):
        volume, _ = registry.create_volume(f"{name}-disk", GIB, None, None)
        registry.create_instance(Instance(
            id=f"{n:016x}", name=name, memory=256 * MIB, vcpus=1, volume=volume.id,
            nics=(InstanceNic(f"00:16:3e:00:00:0{n}", f"198.18.0.10{n}"),)))
        registry.start_instance(name, DOM0)
        made[name] = registry.instance(name)
    vids = [i.volume for i in made.values()]
    for node in (SN1, SN2):
        registry.record_cloud_report(node, storage(40 * GIB, exported(*vids)))
    says(registry, DOM0, dict.fromkeys(vids, "attached"), [(i, 1) for i in made.values()])
    says(registry, DOM0B, {})
    assert {registry.instance(n).actual for n in NAMES} == {"running"}
    return {n: registry.instance(n) for n in NAMES}


def arrive(registry, name, *, source_guests, target_guests):
    """The target listens, the source sends and releases, the target runs the guest."""
    step = registry.instance(name).migration
    vid = registry.instance(name).volume
    says(registry, DOM0B, {vid: "standby"}, target_guests, moves=[
        {"id": step.id, "side": "target", "state": "listening", "port": 40100}])
    says(registry, DOM0, {vid: "released"}, source_guests, moves=[
        {"id": step.id, "side": "source", "state": "released"}])
    moved = registry.instance(name)
    says(registry, DOM0B, {vid: "attached"}, [*target_guests, (moved, step.epoch)], moves=[
        {"id": step.id, "side": "target", "state": "running"}])
    assert registry.instance(name).claim == Claim(DOM0B, step.epoch)


def fail(registry, name, guests):
    step = registry.instance(name).migration
    vid = registry.instance(name).volume
    says(registry, DOM0, {vid: "attached"}, guests, moves=[
        {"id": step.id, "side": "source", "state": "failed", "error": "stream cut"}])


def status(registry):
    return registry.dom0_drain(registry.lookup(DOM0))


def test_a_drain_moves_every_instance_two_at_a_time_and_ends_drained(registry):
    made = three_on_dom0_1(registry)
    node, generation = registry.drain_node("dom0-1")  # default: 2 at once
    assert node.drained is not None
    moving = {n: registry.instance(n).migration for n in NAMES}
    assert moving["web"] is None and moving["app"].target == moving["db"].target == DOM0B
    assert status(registry) == {"requested": node.drained, "parallel": 2,
                                "instances_left": 3, "moving": ["app", "db"], "stuck": []}
    # app arrives: web starts in the same write (the dom0 report that completed app).
    arrive(registry, "app", source_guests=[(made["db"], 1), (made["web"], 1)],
           target_guests=[])
    assert registry.instance("web").migration.target == DOM0B
    assert status(registry)["moving"] == ["db", "web"]
    assert registry.cloud_generation() > generation
    arrive(registry, "db", source_guests=[(made["web"], 1)],
           target_guests=[(registry.instance("app"), 2)])
    assert registry.lookup(DOM0).to_json()["drained"] is True
    arrive(registry, "web", source_guests=[],
           target_guests=[(registry.instance("app"), 2), (registry.instance("db"), 2)])
    assert status(registry)["instances_left"] == 0
    stages = [e.stage for e in registry.events(DOM0)]
    assert stages.count("node.drained") == 1 and stages.index("node.drain") < \
        stages.index("node.drained"), stages
    # Drained: nothing is placed there, and the line says so.
    assert registry.start_instance("app", None)[0].claim.node == DOM0B
    line = drain_line({"hostname": "dom0-1", "mac": DOM0, "drain": status(registry)})
    assert line == "dom0-1 drained: no instance left, safe to power off"


def test_one_that_fails_twice_stays_named_and_a_new_drain_tries_again(registry):
    made = three_on_dom0_1(registry)
    registry.drain_node("dom0-1", parallel=1)
    assert [n for n in NAMES if registry.instance(n).migration] == ["app"]
    everyone = [(made[n], 1) for n in NAMES]
    fail(registry, "app", everyone)  # retried at once: one failure is no verdict
    assert registry.instance("app").migration is not None
    fail(registry, "app", everyone)  # twice: the drain leaves it, and goes on with db
    assert registry.instance("app").migration is None
    assert registry.instance("app").claim == Claim(DOM0, 1)
    shown = status(registry)
    assert shown["moving"] == ["db"] and shown["stuck"] == [{
        "instance": "app", "given_up": True,
        "reason": "2 migrations failed, it stays: source: stream cut"}], shown
    arrive(registry, "db", source_guests=[(made["app"], 1), (made["web"], 1)],
           target_guests=[])
    arrive(registry, "web", source_guests=[(made["app"], 1)],
           target_guests=[(registry.instance("db"), 2)])
    node = {"hostname": "dom0-1", "mac": DOM0, "drain": status(registry)}
    assert drain_line(node) == ("draining dom0-1: 1 instance left; app: 2 migrations "
                                "failed, it stays: source: stream cut")
    assert "node.drained" not in [e.stage for e in registry.events(DOM0)]
    # --wait gives up at once: nothing more happens by itself.
    with pytest.raises(Conflict, match="1 instance left") as given_up:
        cmd_drain(argparse.Namespace(action="drain", node="dom0-1", wait=60.0, parallel=None),
                  Answer(node), sleep=lambda s: None)
    assert "node undrain dom0-1" in given_up.value.hint
    registry.undrain_node("dom0-1")
    registry.drain_node("dom0-1")
    assert registry.instance("app").migration is not None


def test_an_instance_with_no_room_elsewhere_waits_with_the_reason(registry):
    made = three_on_dom0_1(registry)
    says(registry, DOM0B, {}, xen={**XEN, "free_memory_mib": 300})  # room for one
    registry.drain_node("dom0-1", parallel=3)
    assert [n for n in NAMES if registry.instance(n).migration] == ["app"]
    shown = status(registry)
    assert [s["instance"] for s in shown["stuck"]] == ["db", "web"], shown
    assert "no dom0 can take 256 MiB" in shown["stuck"][0]["reason"]
    assert "dom0-2: 44 MiB free" in shown["stuck"][0]["reason"]
    assert shown["stuck"][0]["given_up"] is False
    # Room comes (another dom0's report): the next report starts them.
    says(registry, DOM0B, {registry.instance("app").volume: "standby"})
    says(registry, DOM0, {i.volume: "attached" for i in made.values()},
         [(i, 1) for i in made.values()])
    assert [n for n in NAMES if registry.instance(n).migration] == ["app", "db", "web"]


def test_a_dom0_with_a_volume_that_is_no_guests_disk_is_refused(registry):
    three_on_dom0_1(registry)
    registry.create_volume("scratch", GIB, None, None)
    registry.attach_volume("scratch", "dom0-1")
    with pytest.raises(VolumeInUse, match=r"no instance's disk there \(scratch\)"):
        registry.drain_node("dom0-1")
    assert registry.lookup(DOM0).drained is None
    assert not [n for n in NAMES if registry.instance(n).migration]


@pytest.mark.parametrize("value", [0, 17, "2", True, 1.5])
def test_parallel_must_be_a_small_integer(value):
    with pytest.raises(InvalidRequest, match="parallel must be an integer from 1 to 16"):
        parallel(value)


def test_next_moves_fills_the_free_slots_by_name():
    def on(name, moving=False):
        from configserver.cloud.migration import new_migration
        return Instance(id=name, name=name, memory=MIB, vcpus=1, volume=None,
                        claim=Claim(DOM0, 1),
                        migration=new_migration(DOM0, DOM0B, 2, 0.0) if moving else None)
    everyone = [on("c"), on("a", moving=True), on("b"), on("d")]
    assert [i.name for i in next_moves(everyone, DOM0, 3, {})] == ["b", "c"]
    assert [i.name for i in next_moves(everyone, DOM0, 3, {"b": 2})] == ["c", "d"]
    assert next_moves(everyone, DOM0, 1, {}) == []
    assert next_moves(everyone, DOM0B, 3, {}) == []


class Answer:
    """The API's answers to a ``node drain --wait``: the same node each time."""

    def __init__(self, node):
        self.node = node

    def post(self, path, body):
        return self.node

    def get(self, path):
        return self.node
