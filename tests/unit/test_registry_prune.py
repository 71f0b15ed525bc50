"""Pruning boot events in bounded steps, measured in rows and SQLite VM instructions (not
wall-clock time, which a shared machine makes meaningless), on tables up to 600,000 rows."""

from __future__ import annotations

import sqlite3
import time

import pytest

from configserver.model import NodeSpec
from configserver.registry import events as boot_events
from configserver.registry.events import PRUNE_BATCH, PrunePass
from configserver.registry.schema import MIGRATIONS, split_sql
from configserver.registry.sqlite import SqliteRegistry

# The old pruning: one statement over the whole table (2.28 s at 600k rows).
OLD_PRUNE = ("DELETE FROM events WHERE id IN (SELECT id FROM (SELECT id, row_number() OVER "
             "(PARTITION BY mac ORDER BY id DESC) AS n FROM events) WHERE n > ?)")


def events_table(rows: int, *, chatty_share: int = 6, quiet: int = 599) -> sqlite3.Connection:
    """``rows`` events, interleaved as a busy server writes them: one chatty node has every
    ``chatty_share``-th event, ``quiet`` others share the rest."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    for statement in split_sql(MIGRATIONS[0]):
        if "events" in statement and "INDEX" not in statement:
            db.execute(statement)
    db.execute(
        "WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i < ?) "
        "INSERT INTO events (mac, time, stage, detail) SELECT CASE WHEN i % ? = 0 THEN "
        "'52:54:00:00:00:00' ELSE printf('52:54:00:00:%02x:%02x', 1 + (i % ?) / 256, "
        "(i % ?) % 256) END, i, 'dhcp.discover', '{\"arch\":0}' FROM c",
        (rows - 1, chatty_share, quiet, quiet))
    db.execute("CREATE INDEX events_mac ON events(mac, id)")  # as the schema has it
    return db


def vm_instructions(db: sqlite3.Connection, work) -> tuple[int, object]:
    """How many SQLite VM instructions (to the nearest 100) ``work`` took, and its result."""
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    db.set_progress_handler(tick, 100)
    try:
        result = work()
    finally:
        db.set_progress_handler(None, 0)
    return count[0] * 100, result


def prune_in_steps(db: sqlite3.Connection, **kwargs) -> dict:
    """Run one whole pass, one transaction per step as the writer does; what each step cost."""
    prune = PrunePass(**kwargs)
    rows, work, seconds = [], [], []
    while True:
        before = db.total_changes
        start = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        ops, more = vm_instructions(db, lambda: prune.step(db))
        db.execute("COMMIT")
        seconds.append(time.perf_counter() - start)
        rows.append(db.total_changes - before)
        work.append(ops)
        if not more:
            break
    return {"pass": prune, "rows": rows, "work": work, "seconds": sorted(seconds)}


def kept(db: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    return {mac: (count, low) for mac, count, low in db.execute(
        "SELECT mac, count(*), min(id) FROM events GROUP BY mac")}


def test_a_pass_keeps_the_newest_events_of_each_mac_and_deletes_in_bounded_steps():
    db = events_table(3000, chatty_share=3, quiet=7)  # 1000 chatty events, ~286 each other
    newest = {mac: [i for (i,) in db.execute(
        "SELECT id FROM events WHERE mac=? ORDER BY id DESC LIMIT 100", (mac,))]
        for (mac,) in db.execute("SELECT DISTINCT mac FROM events")}
    result = prune_in_steps(db, kept=100, batch=64)
    assert max(result["rows"]) == 64  # the chatty node took several full steps
    for mac, ids in newest.items():
        assert [i for (i,) in db.execute("SELECT id FROM events WHERE mac=? ORDER BY id DESC",
                                         (mac,))] == ids
    assert result["pass"].deleted == 3000 - 8 * 100


def test_no_step_grows_with_the_table_even_at_600k_rows(capsys):
    # The same nodes' histories (about 840 events each, one chatty node with a sixth of them),
    # ten times as many nodes.
    small, large = events_table(60_000, quiet=59), events_table(600_000, quiet=599)
    old = events_table(60_000, quiet=59)
    old_work, deleted = vm_instructions(old, lambda: old.execute(OLD_PRUNE, (1000,)).rowcount)
    assert deleted == 10_000 - 1000  # the same job
    on_small = prune_in_steps(small)
    on_large = prune_in_steps(large)
    assert max(on_large["rows"]) == PRUNE_BATCH  # no step deletes more than one batch
    assert on_large["pass"].deleted == 100_000 - 1000  # the chatty node, down to 1000
    assert on_small["pass"].deleted == 10_000 - 1000
    assert all(count <= 1000 for count, _ in kept(large).values())
    # Ten times the rows, about the same work per step (an index is a little deeper).
    assert max(on_large["work"]) <= 2 * max(on_small["work"])
    # The old single statement did more work at 60,000 rows than any step at 600,000.
    assert old_work > 20 * max(on_large["work"])
    seconds = on_large["seconds"]
    with capsys.disabled():
        print(f"\n600k rows: {len(seconds)} steps, at most {max(on_large['rows'])} rows and "
              f"{max(on_large['work'])} VM instructions each; median "
              f"{1000 * seconds[len(seconds) // 2]:.2f} ms, max {1000 * seconds[-1]:.2f} ms "
              f"(old statement at 60k rows: {old_work} VM instructions)")


async def test_the_writer_prunes_between_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(boot_events, "EVENTS_KEPT_PER_NODE", 20)
    monkeypatch.setattr("configserver.registry.sqlite.EVENTS_KEPT_PER_NODE", 20)
    monkeypatch.setattr("configserver.registry.sqlite.PRUNE_AFTER", 100)
    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    try:
        registry.add_node(NodeSpec("52:54:00:aa:bb:01", "storage"))
        for n in range(150):
            registry.record_event("52:54:00:aa:bb:01", "dhcp.discover", {"n": n})
        await registry.writer._task  # the flush task ends once the queue and the pass are done
        assert registry.writer.maintenance is None
        events = registry.events("52:54:00:aa:bb:01")
        assert [e.detail["n"] for e in events] == list(range(130, 150))
    finally:
        registry.close()


@pytest.mark.parametrize("kept_events", [0, 1])
def test_a_pass_over_an_empty_or_small_table_ends(kept_events):
    db = events_table(2, quiet=1)
    result = prune_in_steps(db, kept=kept_events)
    assert result["pass"].deleted == 2 - kept_events * 2
