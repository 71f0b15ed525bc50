"""Instances' rows in SQLite (schema 7): create, claims through start/stop/gone, NIC lookup,
usage over time."""

from __future__ import annotations

import sqlite3

import pytest

from configserver.cloud.instances import Claim, Desired, Instance, InstanceNic
from configserver.cloud.model import MIB
from configserver.errors import ClaimHeld, DuplicateVolume, NotFound
from configserver.registry import instances as rows
from configserver.registry.schema import MIGRATIONS, split_sql

A, B = "52:54:00:00:00:01", "52:54:00:00:00:02"


@pytest.fixture
def db():
    connection = sqlite3.connect(":memory:", isolation_level=None)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA foreign_keys=ON")
    for script in MIGRATIONS:
        for statement in split_sql(script):
            connection.execute(statement)
    add_dom0s(connection)
    yield connection
    connection.close()


def add_dom0s(db: sqlite3.Connection, *, free_mib: int = 1024) -> None:
    db.execute("INSERT OR IGNORE INTO roles (name, image, template) VALUES ('dom0','dom0','xen')")
    for number, mac in enumerate((A, B), start=1):
        db.execute("INSERT INTO nodes (mac, role, hostname, state, created, updated) "
                   "VALUES (?, 'dom0', ?, 'ready', 0, 0)", (mac, f"dom0-{number}"))
        db.execute("INSERT INTO nics (mac, node, position) VALUES (?, ?, 0)", (mac, mac))
        db.execute("INSERT INTO dom0_reports VALUES (?, ?, 0)",
                   (mac, f'{{"free_memory_mib": {free_mib}}}'))


def web() -> Instance:
    return Instance(id="0123456789abcdef", name="web", memory=256 * MIB, vcpus=2, volume=None,
                    nics=(InstanceNic("00:16:3e:00:00:01", "198.18.0.100"),),
                    ssh_keys=("ssh-ed25519 AAAA test",), image="guest")


def test_create_round_trips_and_refuses_a_duplicate(db):
    created, generation = rows.create(db, web(), now=10.0)
    assert generation == 1
    assert rows.by_name(db, "web") == created
    assert created.desired == Desired.STOPPED and created.claim is None
    assert created.ssh_keys == ("ssh-ed25519 AAAA test",)
    with pytest.raises(DuplicateVolume):
        rows.create(db, web(), now=11.0)
    assert len(rows.load_all(db)) == 1
    assert [e["stage"] for e in rows.events(db, created.id)] == ["created"]


def test_the_nic_lookup_answers_for_instance_macs_only(db):
    rows.create(db, web(), now=1.0)
    found = rows.nic(db, "00:16:3e:00:00:01")
    assert found is not None and found[0].name == "web" and found[1].ip == "198.18.0.100"
    assert rows.nic(db, "00:16:3e:00:00:02") is None
    macs, ips = rows.used_addresses(db)  # the nodes' NICs count too (the fixture's dom0s)
    assert "00:16:3e:00:00:01" in macs and ips >= {"198.18.0.100"}
    node_macs = {r[0] for r in db.execute("SELECT mac FROM nics")}
    assert macs == {"00:16:3e:00:00:01"} | node_macs


def test_an_address_is_never_stored_twice(db):
    rows.create(db, web(), now=1.0)
    other = Instance(id="1111111111111111", name="db", memory=128 * MIB, vcpus=1, volume=None,
                     nics=(InstanceNic("00:16:3e:00:00:02", "198.18.0.100"),))
    with pytest.raises(sqlite3.IntegrityError):
        rows.create(db, other, now=2.0)


def test_start_stop_gone_moves_the_claim_once(db):
    rows.create(db, web(), now=1.0)
    started, gen = rows.start(db, "web", A, now=2.0)
    assert started.claim == Claim(A, 1) and gen == 2
    again, gen2 = rows.start(db, "web", A, now=3.0)
    assert again == started and gen2 == gen  # repeated: no change, no new generation
    with pytest.raises(ClaimHeld):
        rows.start(db, "web", B, now=3.0)
    assert rows.by_name(db, "web").claim == Claim(A, 1)
    rows.stop(db, "web", now=4.0)
    held, _ = rows.gone(db, "web", B, 1, now=5.0)  # not the holder: nothing
    assert held.claim == Claim(A, 1)
    released, _ = rows.gone(db, "web", A, 1, now=6.0)
    assert released.claim is None and released.epoch == 1
    moved, _ = rows.start(db, "web", B, now=7.0)
    assert moved.claim == Claim(B, 2)
    assert [e["stage"] for e in rows.events(db, moved.id)] == [
        "created", "start.requested", "stop.requested", "claim.released", "start.requested"]


def test_unknown_instance_is_not_found(db):
    with pytest.raises(NotFound):
        rows.start(db, "nope", A, now=1.0)


def _xen(registry, mac: str, free_mib: int) -> None:
    from cloudtest import dom0_report

    report = dom0_report()
    report["dom0"]["xen"] = {"free_memory_mib": free_mib}
    registry.record_cloud_report(mac, report)


def test_fifty_concurrent_starts_leave_one_holder(tmp_path):
    """50 threads start one instance through the registry at once, naming three dom0s or
    none (the scheduler's choice): one claim, on the dom0 of a start that succeeded; every
    start naming another dom0 is refused with ClaimHeld, and one naming the holder or none
    changes nothing."""
    from concurrent.futures import ThreadPoolExecutor

    from cloudtest import DOM0, DOM0B, cloud, ready

    from configserver.registry.sqlite import SqliteRegistry

    third = "52:54:00:00:d0:03"
    dom0s = (DOM0, DOM0B, third, None)
    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    try:
        cloud(registry, dom0s=2)
        ready(registry, third, "dom0", "dom0-3")
        for mac in (DOM0, DOM0B, third):
            _xen(registry, mac, 1024)
        registry.create_instance(web())

        def start(i: int) -> tuple[str | None, str]:
            node = dom0s[i % 4]
            try:
                registry.start_instance("web", node)
            except ClaimHeld:
                return node, "refused"
            return node, "ok"

        with ThreadPoolExecutor(max_workers=50) as pool:
            results = list(pool.map(start, range(50)))
        final = registry.instance("web")
        assert final.claim is not None and final.claim.epoch == 1
        assert {node for node, outcome in results if outcome == "ok"} <= {final.claim.node,
                                                                         None}
        assert all(outcome == "refused" for node, outcome in results
                   if node not in (final.claim.node, None))
        assert all(outcome == "ok" for node, outcome in results if node is None)
        stages = [e["stage"] for e in registry.instance_events(final.id)]
        assert stages == ["created", "start.requested"]
    finally:
        registry.close()


def test_the_scheduler_places_a_start_without_a_dom0(tmp_path):
    from cloudtest import DOM0, DOM0B, cloud

    from configserver.errors import NoRoom
    from configserver.registry.sqlite import SqliteRegistry

    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    try:
        cloud(registry, dom0s=2)
        registry.create_instance(web())
        with pytest.raises(NoRoom, match="dom0-1: has not reported its memory yet"):
            registry.start_instance("web")
        assert registry.instance("web").claim is None
        _xen(registry, DOM0, 200)
        _xen(registry, DOM0B, 900)
        started, _ = registry.start_instance("web")
        assert started.claim == Claim(DOM0B, 1)
        registry.drain_node("dom0-2")
        with pytest.raises(Exception, match="drained"):
            registry.start_instance("web", "dom0-2")
    finally:
        registry.close()


def test_reboot_counts_and_destroy_forgets_once_gone(tmp_path):
    from cloudtest import DOM0, GIB, cloud, dom0_report

    from configserver.errors import Conflict
    from configserver.registry.sqlite import SqliteRegistry

    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    pool = ("198.18.0.100", "198.18.0.101")
    try:
        cloud(registry, dom0s=1)
        created, _ = registry.create_instance_with_disk(
            name="web", memory=256 * MIB, vcpus=1, image=None, disk=2 * GIB, tenant=None,
            ssh_keys=(), pool=pool)
        with pytest.raises(Conflict, match="only a running instance reboots"):
            registry.reboot_instance("web")
        registry.start_instance("web", DOM0)
        rebooted, _ = registry.reboot_instance("web")
        assert rebooted.reboots == 1
        doomed, _ = registry.destroy_instance("web", delete_disk=True)
        assert doomed.desired == Desired.DESTROYED and doomed.claim == Claim(DOM0, 1)
        with pytest.raises(Conflict, match="being destroyed"):
            registry.start_instance("web", DOM0)
        assert registry.instance("web") is not None  # its dom0 has not reported it gone
        gone = {"dom0": {**dom0_report()["dom0"],
                         "guests": [{"id": created.id, "epoch": 1, "state": "stopped"}]}}
        registry.record_cloud_report(DOM0, gone, doomed.desired_generation - 1)
        assert registry.instance("web") is not None  # a pass that had not seen the destroy
        registry.record_cloud_report(DOM0, gone, registry.cloud_generation())
        assert registry.instance("web") is None
        assert registry.volume("web-disk").state == "deleting"
        assert registry.instance_nic(created.nics[0].mac) is None
        # the DHCP server's question is answered from the read cache while nothing changes
        hits = registry._cache.hits
        assert registry.instance_nic(created.nics[0].mac) is None
        assert registry._cache.hits == hits + 1
        stages = [e["stage"] for e in registry.instance_events(created.id)]
        assert stages[-3:] == ["destroy.requested", "claim.released", "destroyed"]
        # its address is free again
        again, _ = registry.create_instance_with_disk(
            name="web2", memory=256 * MIB, vcpus=1, image=None, disk=2 * GIB, tenant=None,
            ssh_keys=(), pool=pool)
        assert again.nics[0].ip == created.nics[0].ip
        # an instance no dom0 holds goes at once and keeps its disk
        kept, _ = registry.destroy_instance("web2")
        assert registry.instance("web2") is None and registry.volume("web2-disk") is not None
        assert kept.claim is None
    finally:
        registry.close()


def test_the_volume_follows_the_claim_and_never_sits_on_two_dom0s(tmp_path):
    from dataclasses import replace

    from cloudtest import DOM0, DOM0B, GIB, cloud, dom0_report

    from configserver.errors import VolumeInUse
    from configserver.registry.sqlite import SqliteRegistry

    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    try:
        cloud(registry, dom0s=2)
        volume, _ = registry.create_volume("web-disk", 2 * GIB, None, None)
        registry.create_instance(replace(web(), volume=volume.id))
        registry.start_instance("web", DOM0)
        assert [a.node for a in registry.volume("web-disk").attachments] == [DOM0]
        registry.stop_instance("web")
        registry.instance_gone("web", DOM0, 1)
        [leaving] = registry.volume("web-disk").attachments
        assert leaving.node == DOM0 and leaving.detaching
        with pytest.raises(VolumeInUse, match="still detaching"):
            registry.start_instance("web", DOM0B)
        assert registry.instance("web").claim is None  # the refused start stored nothing
        registry.record_cloud_report(DOM0, dom0_report(detached=(volume.id,)))
        assert registry.volume("web-disk").attachments == ()
        moved, _ = registry.start_instance("web", DOM0B)
        assert moved.claim == Claim(DOM0B, 2)
        assert [a.node for a in registry.volume("web-disk").attachments] == [DOM0B]
    finally:
        registry.close()


def test_create_with_disk_is_one_transaction(tmp_path):
    from cloudtest import GIB, cloud

    from configserver.errors import InvalidRequest, NoRoom
    from configserver.registry.sqlite import SqliteRegistry

    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    pool = ("198.18.0.100", "198.18.0.101")
    args = dict(memory=256 * MIB, vcpus=1, image=None, tenant="acme", ssh_keys=(), pool=pool)
    try:
        cloud(registry, dom0s=1)
        web, _ = registry.create_instance_with_disk(name="web", disk=2 * GIB, **args)
        assert registry.volume("web-disk").id == web.volume
        assert registry.volume("web-disk").tenant == "acme"
        assert web.nics[0].mac.startswith("00:16:3e:") and web.nics[0].ip == "198.18.0.100"
        db, _ = registry.create_instance_with_disk(name="db", disk=GIB, ip="198.18.0.101",
                                                   **args)
        assert db.nics[0].ip == "198.18.0.101" and db.nics[0].mac != web.nics[0].mac
        # Refusals store nothing: neither the instance nor its volume.
        with pytest.raises(InvalidRequest, match="full"):
            registry.create_instance_with_disk(name="full", disk=GIB, **args)
        with pytest.raises(NoRoom):
            registry.create_instance_with_disk(name="huge", disk=1000 * GIB, **args)
        with pytest.raises(DuplicateVolume):
            registry.create_instance_with_disk(name="web", disk=GIB, **args)
        assert [i.name for i in registry.instances()] == ["db", "web"]
        assert sorted(v.name for v in registry.volumes()) == ["db-disk", "web-disk"]
    finally:
        registry.close()


def test_an_instance_never_takes_a_registered_node_s_address(tmp_path):
    from cloudtest import GIB, cloud

    from configserver.model import NodeSpec
    from configserver.registry.sqlite import SqliteRegistry

    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    try:
        cloud(registry, dom0s=1)
        registry.add_node(NodeSpec(mac="52:54:00:00:0a:01", role="dom0", hostname="spare",
                                   ip="198.18.0.100"))
        web, _ = registry.create_instance_with_disk(
            name="web", disk=GIB, memory=256 * MIB, vcpus=1, image=None, tenant=None,
            ssh_keys=(), pool=("198.18.0.100", "198.18.0.101"))
        assert web.nics[0].ip == "198.18.0.101"
    finally:
        registry.close()


def test_a_dom0_report_moves_the_guest_map_and_refuses_malformed_guests(tmp_path):
    from dataclasses import replace

    from cloudtest import DOM0, DOM0B, GIB, attachment, cloud, dom0_report

    from configserver.errors import InvalidReport
    from configserver.registry.sqlite import SqliteRegistry

    def guests_report(state, epoch=1, cpu=2.0, attached=True):
        body = dom0_report(*([attachment(volume.id)] if attached else []),
                           detached=() if attached else (volume.id,))
        body["dom0"]["xen"] = {"free_memory_mib": 1400, "hap": False}
        body["dom0"]["guests"] = [{"id": started.id, "domain": "nb-web", "epoch": epoch,
                                   "state": state, "domid": 7, "cpu_seconds": cpu}]
        # Keys an agent may send that clash with the registry's own names are not detail.
        body["dom0"]["events"] = [{"time": 1.0, "domain": "nb-web", "stage": "created",
                                   "db": "x", "instance": "y", "now": "z", "epoch": epoch}]
        return body

    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    try:
        cloud(registry, dom0s=2)
        volume, _ = registry.create_volume("web-disk", 2 * GIB, None, None)
        registry.create_instance(replace(web(), volume=volume.id))
        started, _ = registry.start_instance("web", DOM0)
        with pytest.raises(InvalidReport):
            bad = guests_report("running")
            bad["dom0"]["guests"][0]["epoch"] = "1"
            registry.record_cloud_report(DOM0, bad)
        assert registry.instance("web").actual == "stopped"  # nothing stored
        assert registry.dom0_facts(DOM0) is None
        registry.record_cloud_report(DOM0, guests_report("blocked"))
        now = registry.instance("web")
        assert now.actual == "running" and now.usage["cpu_seconds"] == 2.0
        assert registry.dom0_facts(DOM0) == {"free_memory_mib": 1400, "hap": False}
        # Another dom0 claiming to run it changes nothing; what it did is on the record.
        registry.flush()
        registry.record_cloud_report(DOM0B, guests_report("running", cpu=99.0))
        assert registry.instance("web").usage["cpu_seconds"] == 2.0
        registry.flush()
        assert "guest.created" in [e.stage for e in registry.events(DOM0B)]
        assert "guest.created" not in [e.stage for e in registry.events(DOM0)]
        registry.stop_instance("web")
        registry.record_cloud_report(DOM0, guests_report("stopped", cpu=None),
                                     registry.cloud_generation())
        stopped = registry.instance("web")
        assert stopped.claim is None and stopped.actual == "stopped"
        assert registry.volume("web-disk").attachments[0].detaching
        stages = [e["stage"] for e in registry.instance_events(stopped.id)]
        assert stages == ["created", "start.requested", "agent.created", "guest.running",
                          "agent.created", "stop.requested", "agent.created", "guest.stopped",
                          "claim.released"]
        assert registry.instance_events(stopped.id)[4]["detail"]["node"] == DOM0B
    finally:
        registry.close()


def test_an_instance_s_disk_is_not_the_volumes_api_s_to_move(tmp_path):
    """Not detached from under a running guest, not attached to a second dom0, not deleted
    while the instance exists; an admin's force detach still fences a dom0, and may look at
    a stopped instance's disk (its start is refused while the disk is elsewhere)."""
    from cloudtest import DOM0, DOM0B, GIB, cloud

    from configserver.errors import VolumeInUse
    from configserver.registry.sqlite import SqliteRegistry

    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    try:
        cloud(registry, dom0s=2)
        registry.create_instance_with_disk(
            name="web", memory=256 * MIB, vcpus=1, image=None, disk=2 * GIB, tenant=None,
            ssh_keys=(), pool=("198.18.0.100", "198.18.0.101"))
        with pytest.raises(VolumeInUse, match="disk of instance web"):
            registry.delete_volume("web-disk")
        registry.attach_volume("web-disk", DOM0B)  # an admin looks at it, stopped
        for there in (DOM0, DOM0B):  # not on its array while the admin has it open
            with pytest.raises(VolumeInUse, match="by hand"):
                registry.start_instance("web", there)
        assert registry.instance("web").claim is None  # refused whole
        registry.detach_volume("web-disk", DOM0B, force=True)
        registry.start_instance("web", DOM0)
        with pytest.raises(VolumeInUse, match="holds its claim on"):
            registry.detach_volume("web-disk", DOM0)
        with pytest.raises(VolumeInUse):
            registry.attach_volume("web-disk", DOM0B)
        # Taken from under it by force, its disk comes back with the next start there.
        registry.detach_volume("web-disk", DOM0, force=True)
        again, _ = registry.start_instance("web")
        assert again.claim.node == DOM0 and registry.volume("web-disk").attachment(DOM0)
        assert registry.volume("web-disk").attachment(DOM0) is not None  # nothing changed
        detached, _ = registry.detach_volume("web-disk", DOM0, force=True)
        assert detached.attachment(DOM0) is None
        registry.create_volume("plain", 2 * GIB, None, None)
        attached, _ = registry.attach_volume("plain", DOM0B)  # any other volume: as before
        assert attached.attachment(DOM0B) is not None
    finally:
        registry.close()


def test_a_change_names_the_instance_it_was_allowed_on(tmp_path):
    """The API checks the caller's tenant on the instance it read; the write then acts only
    on that same instance (by id), not on a namesake made in between."""
    from dataclasses import replace

    from cloudtest import DOM0, cloud

    from configserver.errors import NotFound
    from configserver.registry.sqlite import SqliteRegistry

    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    try:
        cloud(registry, dom0s=1)
        first, _ = registry.create_instance(replace(web(), tenant="acme"))
        registry.destroy_instance("web", expect=first.id)  # never placed: gone at once
        second, _ = registry.create_instance(replace(web(), id="fedcba9876543210",
                                                     tenant="globex"))
        for act in (lambda: registry.start_instance("web", DOM0, expect=first.id),
                    lambda: registry.stop_instance("web", expect=first.id),
                    lambda: registry.reboot_instance("web", expect=first.id),
                    lambda: registry.destroy_instance("web", expect=first.id)):
            with pytest.raises(NotFound):
                act()
        assert registry.instance("web") == second
        started, _ = registry.start_instance("web", DOM0, expect=second.id)
        assert started.claim is not None
    finally:
        registry.close()


def test_usage_since_a_time_from_the_samples_and_the_final_totals_kept(db):
    from cloudtest import dom0_report

    rows.create(db, web(), now=0.0)
    started, _ = rows.start(db, "web", A, now=1.0)

    def report(now, cpu, rx, domid=7):
        body = dom0_report()
        body["dom0"]["guests"] = [{"id": started.id, "epoch": 1, "state": "running",
                                   "domid": domid, "cpu_seconds": cpu, "net_rx_bytes": rx}]
        rows.record_report(db, A, body, now=now, seen=None)

    report(100.0, 1.0, 1000)   # sampled: the first
    report(200.0, 2.0, 3000)   # not: too soon after it
    report(500.0, 4.0, 7000)   # sampled
    report(900.0, 1.0, 500, domid=8)  # a new domain (a reboot): its counters from zero
    assert rows.by_name(db, "web").usage["net_rx_bytes"] == 7500
    whole = rows.usage(db, "web", None, now=1000.0)
    assert whole["since"] == 0.0 and whole["usage"]["net_rx_bytes"] == 7500
    assert whole["usage"]["cpu_seconds"] == 5.0 and whole["total"] == whole["usage"]
    later = rows.usage(db, "web", 600.0, now=1000.0)  # rounded down to the sample at 500
    assert later["since"] == 500.0
    assert later["usage"] == {"cpu_seconds": 1.0, "net_rx_bytes": 500, "net_tx_bytes": 0,
                              "disk_read_bytes": 0, "disk_write_bytes": 0}
    early = rows.usage(db, "web", 50.0, now=1000.0)  # before anything was counted
    assert early["usage"]["net_rx_bytes"] == 7500
    with pytest.raises(NotFound):
        rows.usage(db, "nothing", None, now=1.0)
    # Destroyed: the final totals stay on its timeline for billing.
    rows.destroy(db, "web", now=1100.0, delete_disk=False)
    body = dom0_report()
    body["dom0"]["guests"] = [{"id": started.id, "epoch": 1, "state": "stopped"}]
    rows.record_report(db, A, body, now=1200.0, seen=rows.generation(db))
    assert rows.by_name(db, "web") is None
    [destroyed] = [e for e in rows.events(db, started.id) if e["stage"] == "destroyed"]
    assert destroyed["detail"]["usage"]["net_rx_bytes"] == 7500
