"""Lease store: durability across restarts and group commit before the ACK goes out."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from configserver.dhcp.errors import LeaseStoreError
from configserver.dhcp.leases import LeaseState, LeaseStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rows(path):
    with sqlite3.connect(path) as db:
        return {r[0]: r[1:] for r in db.execute("SELECT ip, mac, state FROM leases")}


def test_leases_survive_a_restart(tmp_path):
    clock = Clock()
    store = LeaseStore(tmp_path / "leases.sqlite", clock=clock)
    store.bind("52:54:00:00:00:01", "198.18.0.100", 3600, "a")
    store.bind("52:54:00:00:00:02", "198.18.0.101", 3600)
    store.release("52:54:00:00:00:02", "198.18.0.101")
    store.decline("52:54:00:00:00:03", "198.18.0.102", 600)
    store.offer("52:54:00:00:00:04", "198.18.0.103", 60)
    store.close()
    again = LeaseStore(tmp_path / "leases.sqlite", clock=clock)
    assert again.by_mac("52:54:00:00:00:01").ip == "198.18.0.100"
    assert again.by_mac("52:54:00:00:00:01").hostname == "a"
    assert again.by_ip("198.18.0.101").state == LeaseState.RELEASED
    assert again.by_ip("198.18.0.102").state == LeaseState.DECLINED
    assert again.by_ip("198.18.0.103") is None  # offers are not persisted
    assert not again.is_free_for("198.18.0.102", "52:54:00:00:00:09")
    clock.now += 601
    assert again.is_free_for("198.18.0.102", "52:54:00:00:00:09")
    assert again.holder("198.18.0.100") == "52:54:00:00:00:01"
    again.close()


def test_one_lease_per_mac_moving_frees_the_old_address(tmp_path):
    store = LeaseStore(tmp_path / "leases.sqlite")
    store.bind("52:54:00:00:00:01", "198.18.0.100", 3600)
    store.bind("52:54:00:00:00:01", "198.18.0.120", 3600)
    assert store.by_mac("52:54:00:00:00:01").ip == "198.18.0.120"
    assert store.is_free_for("198.18.0.100", "52:54:00:00:00:02")
    store.close()
    assert rows(tmp_path / "leases.sqlite")["198.18.0.100"][1] == "released"


def test_expired_lease_is_free_for_others(tmp_path):
    clock = Clock()
    store = LeaseStore(tmp_path / "leases.sqlite", clock=clock)
    store.bind("52:54:00:00:00:01", "198.18.0.100", 60)
    assert not store.is_free_for("198.18.0.100", "52:54:00:00:00:02")
    clock.now += 61
    assert store.is_free_for("198.18.0.100", "52:54:00:00:00:02")
    store.close()


async def test_callbacks_run_only_after_commit_and_share_commits(tmp_path):
    path = tmp_path / "leases.sqlite"
    store = LeaseStore(path)
    writes = []
    real_write = store._write

    def counting_write(leases):
        writes.append(len(leases))
        real_write(leases)

    store._write = counting_write
    seen_on_disk = []
    done = asyncio.Event()

    def make_callback(ip):
        def callback():
            seen_on_disk.append(ip in rows(path))
            if len(seen_on_disk) == 200:
                done.set()
        return callback

    for i in range(200):
        ip = f"198.18.{i // 250}.{i % 250 + 1}"
        store.bind(f"52:54:00:00:{i // 256:02x}:{i % 256:02x}", ip, 3600)
        store.when_durable(make_callback(ip))
        if i % 50 == 0:
            await asyncio.sleep(0)
    await asyncio.wait_for(done.wait(), 10)
    assert all(seen_on_disk) and len(seen_on_disk) == 200
    assert sum(writes) == 200
    assert len(writes) < 200  # group commit: fewer commits than ACKs
    await store.drain()
    store.close()


async def test_failed_commit_drops_the_answers(tmp_path, caplog):
    store = LeaseStore(tmp_path / "leases.sqlite")

    def failing_write(leases):
        raise sqlite3.OperationalError("disk I/O error")

    store._write = failing_write
    sent = []
    store.bind("52:54:00:00:00:01", "198.18.0.100", 3600)
    store.when_durable(lambda: sent.append(1))
    await store.drain()
    assert sent == []
    assert "commit of 1 leases failed" in caplog.text
    store._db.close()


def test_unusable_state_dir_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LeaseStoreError):
        LeaseStore(blocker / "leases.sqlite")
