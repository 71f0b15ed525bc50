"""The registry's writer: batched commits off the event loop, order, read-your-writes, bounds,
shutdown and failed commits."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading

import pytest

from configserver.errors import DuplicateMac, StoreError
from configserver.model import Nic, NodeSpec, NodeState
from configserver.registry import events as boot_events
from configserver.registry.sqlite import SqliteRegistry
from configserver.registry.writer import Job

MAC1, MAC2, MAC3 = "52:54:00:aa:bb:01", "52:54:00:aa:bb:02", "52:54:00:aa:bb:03"


@pytest.fixture
def path(tmp_path):
    return tmp_path / "registry.sqlite"


@pytest.fixture
def registry(path):
    reg = SqliteRegistry(path)
    reg.add_node(NodeSpec(MAC1, "storage", "sn1"))
    yield reg
    reg.close()


def on_disk(path, query, *args):
    """What another connection (another process, after a crash) finds in the database."""
    db = sqlite3.connect(path)
    try:
        return db.execute(query, args).fetchall()
    finally:
        db.close()


def stages(path, mac=MAC1):
    return [r[0] for r in on_disk(path, "SELECT stage FROM events WHERE mac=? ORDER BY id", mac)]


async def settled(registry):
    """Until the flush task is done: it ends once nothing is queued (or to prune)."""
    task = registry.writer._task
    if task is not None:
        await task


async def test_events_are_queued_and_committed_in_one_batch(registry, path):
    commits = registry.writer.commits
    for n in range(500):
        registry.record_event(MAC1, "dhcp.discover", {"n": n})
    assert registry.writer.queued == 500
    assert stages(path) == ["registered"]  # nothing written on the caller's time
    await settled(registry)
    assert registry.writer.commits == commits + 1
    details = on_disk(path, "SELECT detail FROM events WHERE stage='dhcp.discover' ORDER BY id")
    assert [d[0] for d in details] == [f'{{"n":{n}}}' for n in range(500)]
    assert registry.writer.written == 500


async def test_the_commit_runs_off_the_event_loop(registry, monkeypatch):
    started, proceed = threading.Event(), threading.Event()
    threads = []

    def slow_batch(db, batch):
        threads.append(threading.current_thread())
        started.set()
        # Deadlocks (and fails) if this ran on the event loop's thread: only the loop
        # sets ``proceed``.
        assert proceed.wait(10), "the event loop did not run during the commit"
        return boot_events.append_batch(db, batch)

    monkeypatch.setattr(registry.writer, "_write_events", slow_batch)
    registry.record_event(MAC1, "dhcp.discover")
    while not started.is_set():
        await asyncio.sleep(0.001)
    proceed.set()
    await settled(registry)
    assert threads and threads[0] is not threading.main_thread()
    assert "dhcp.discover" in [e.stage for e in registry.events(MAC1)]


async def test_order_is_kept_across_events_state_changes_and_operator_writes(registry, path):
    registry.record_event(MAC1, "dhcp.discover", {"arch": 0}, booting=True)
    registry.record_event(MAC1, "dhcp.offer")
    registry.discover(MAC2, {"arch": 7})
    registry.record_event(MAC2, "dhcp.offer")
    # An operator write from a worker thread commits everything queued before it first:
    # the pending MAC2 exists by then, and is adopted.
    node = await asyncio.to_thread(registry.add_node, NodeSpec(MAC2, "dom0", "hv2"))
    assert node.state == NodeState.REGISTERED
    assert stages(path) == ["registered", "dhcp.discover", "state", "dhcp.offer"]
    assert stages(path, MAC2) == ["discovered", "dhcp.offer", "registered"]


async def test_a_read_right_after_a_queued_state_change_sees_it(registry, path):
    registry.record_event(MAC1, "dhcp.discover", booting=True)
    # Not committed yet, but this process's reads see it.
    assert on_disk(path, "SELECT state FROM nodes WHERE mac=?", MAC1) == [("registered",)]
    assert registry.lookup(MAC1).state == NodeState.BOOTING
    assert [n.state for n in registry.list_nodes()] == [NodeState.BOOTING]
    assert [n.mac for n in registry.list_nodes(state=NodeState.BOOTING)] == [MAC1]
    assert registry.list_nodes(state=NodeState.REGISTERED) == []
    pending = registry.discover(MAC3, {"arch": 7})
    assert registry.lookup(MAC3) == pending
    assert on_disk(path, "SELECT mac FROM nodes WHERE mac=?", MAC3) == []
    assert [n.mac for n in registry.list_nodes(state=NodeState.PENDING)] == [MAC3]
    assert [n.mac for n in registry.list_nodes()] == [MAC1, MAC3]
    await settled(registry)
    assert registry._unsettled.states == registry._unsettled.discovered == {}
    assert registry.lookup(MAC1).state == NodeState.BOOTING
    # What the queued write promised is exactly what the database now says.
    assert registry.lookup(MAC3) == pending
    assert on_disk(path, "SELECT state FROM nodes ORDER BY mac") == [("booting",), ("pending",)]


async def test_writes_that_must_be_seen_at_once_return_committed(registry, path):
    """Agent sessions, heartbeats and operator writes are on disk when the call returns."""
    await asyncio.to_thread(registry.start_agent_session, MAC1, "boot-1", "hash")
    assert on_disk(path, "SELECT boot_id, state FROM nodes") == [("boot-1", "booting")]
    node = await asyncio.to_thread(registry.record_heartbeat, MAC1, {"uptime": 1})
    assert node.state == NodeState.READY
    assert on_disk(path, "SELECT state FROM nodes") == [("ready",)]
    with pytest.raises(DuplicateMac):
        await asyncio.to_thread(registry.add_node, NodeSpec(MAC1, "storage"))


async def test_a_full_queue_drops_events_counts_and_logs_them_but_never_a_state_change(
        path, caplog):
    caplog.set_level(logging.WARNING)
    registry = SqliteRegistry(path, queue_limit=10)
    try:
        registry.add_node(NodeSpec(MAC1, "storage"))
        for n in range(25):
            registry.record_event(MAC1, "dhcp.discover", {"n": n})
        registry.record_event(MAC1, "http.script", booting=True)  # the event is dropped...
        assert registry.writer.dropped == 16
        assert caplog.text.count("event dropped") == 1  # rate-limited
        await settled(registry)
        assert registry.lookup(MAC1).state == NodeState.BOOTING  # ...the state change is not
        assert stages(path).count("dhcp.discover") == 10
        assert stages(path)[-1] == "state"
    finally:
        registry.close()


async def test_queued_writes_are_committed_on_a_clean_stop(path):
    registry = SqliteRegistry(path)
    registry.add_node(NodeSpec(MAC1, "storage"))
    for _ in range(100):
        registry.record_event(MAC1, "tftp.start")
    registry.record_event(MAC1, "http.script", booting=True)
    registry.discover(MAC2, {})
    assert registry.writer.queued == 103
    registry.close()  # no await: nothing has been committed by the flush task
    reopened = SqliteRegistry(path)
    try:
        assert [e.stage for e in reopened.events(MAC1)].count("tftp.start") == 100
        assert reopened.lookup(MAC1).state == NodeState.BOOTING
        assert reopened.lookup(MAC2).state == NodeState.PENDING
    finally:
        reopened.close()
    with pytest.raises(StoreError):
        registry.add_node(NodeSpec(MAC3, "storage"))
    registry.record_event(MAC1, "late")  # after close: dropped, no error
    assert registry.writer.dropped == 1


async def test_a_failed_commit_loses_its_batch_whole_and_the_writer_goes_on(registry, path,
                                                                           monkeypatch):
    calls = []

    def failing_once(db, batch):
        calls.append(len(batch))
        if len(calls) == 1:
            boot_events.append_batch(db, batch[:2])  # half written, then the disk fails
            raise sqlite3.OperationalError("disk I/O error")
        return boot_events.append_batch(db, batch)

    monkeypatch.setattr(registry.writer, "_write_events", failing_once)
    registry.record_event(MAC1, "dhcp.discover")
    registry.record_event(MAC1, "dhcp.offer")
    registry.record_event(MAC1, "http.script", booting=True)
    assert registry.lookup(MAC1).state == NodeState.BOOTING
    await settled(registry)
    # The batch was one transaction: none of it is on disk (not even the first half), and
    # the state change it promised is forgotten, so reads agree with the disk again.
    assert calls == [3]
    assert stages(path) == ["registered"]
    assert registry.lookup(MAC1).state == NodeState.REGISTERED
    assert registry.writer.lost == 4
    registry.record_event(MAC1, "dhcp.request")
    await settled(registry)
    assert stages(path) == ["registered", "dhcp.request"]


def test_a_refused_queued_write_leaves_the_rest_of_its_batch(registry, path, caplog):
    def refused(db):
        db.execute("UPDATE nodes SET hostname='changed'")
        raise DuplicateMac("no")

    writer = registry.writer
    writer._queue.extend([(MAC1, 1.0, "before", {}), Job(99, refused),
                          (MAC1, 2.0, "after", {})])
    writer.flush()
    assert writer.commits == 2  # the add_node of the fixture, then this batch
    assert on_disk(path, "SELECT hostname FROM nodes") == [("sn1",)]
    assert stages(path) == ["registered", "before", "after"]
    assert "queued write refused" in caplog.text


def test_without_an_event_loop_writes_commit_at_once(registry, path):
    registry.record_event(MAC1, "dhcp.discover", booting=True)
    assert registry.writer.queued == 0
    assert stages(path) == ["registered", "dhcp.discover", "state"]


async def test_events_of_unknown_macs_are_skipped_and_any_nic_names_its_node(registry, path):
    await asyncio.to_thread(registry.update_node, MAC1, {"nics": (Nic(MAC2),)})
    registry.record_event(MAC2, "dhcp.discover")
    registry.record_event(MAC3, "dhcp.discover")
    await settled(registry)
    assert stages(path)[-1] == "dhcp.discover"
    assert on_disk(path, "SELECT count(*) FROM events WHERE mac=?", MAC3) == [(0,)]
    assert registry.lookup(MAC1).last_seen is not None
