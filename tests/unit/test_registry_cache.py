"""The registry's read cache: no answer outlives a write of this process; the rest expires."""

from __future__ import annotations

import asyncio
import sqlite3

from configserver.model import NodeSpec, NodeState, UnknownMacPolicy
from configserver.registry.cache import ReadCache
from configserver.registry.sqlite import SqliteRegistry

MAC1, MAC2 = "52:54:00:aa:bb:01", "52:54:00:aa:bb:02"


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_answers_are_remembered_until_ttl_or_invalidate():
    clock = Clock()
    cache = ReadCache(ttl=1.0, clock=clock)
    loads = []

    def load(key):
        loads.append(key)
        return f"value of {key}"

    assert cache.get("a", load, "a") == cache.get("a", load, "a") == "value of a"
    assert loads == ["a"]
    clock.now += 1.5
    cache.get("a", load, "a")
    cache.invalidate()
    cache.get("a", load, "a")
    assert loads == ["a", "a", "a"]
    assert (cache.hits, cache.misses) == (1, 3)


def test_an_answer_read_while_a_write_committed_is_not_kept():
    cache = ReadCache()

    def load_during_a_commit():
        cache.invalidate()  # the writer commits while this read is under way
        return "maybe older than the write"

    assert cache.get("a", load_during_a_commit) == "maybe older than the write"
    assert cache.get("a", lambda: "fresh") == "fresh"


def test_the_cache_is_bounded():
    cache = ReadCache(limit=10)
    for n in range(25):
        cache.get(n, lambda: None)
    assert len(cache._entries) <= 10


async def test_a_lookup_after_any_write_sees_it(tmp_path):
    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    try:
        assert registry.lookup(MAC1) is None  # remembered as unknown...
        await asyncio.to_thread(registry.add_node, NodeSpec(MAC1, "storage", "sn1",
                                                             "198.18.0.21"))
        assert registry.lookup(MAC1).hostname == "sn1"  # ...until the write
        assert registry.lookup_ip("198.18.0.21").mac == MAC1
        await asyncio.to_thread(registry.update_node, MAC1, {"hostname": "sn2",
                                                             "ip": "198.18.0.22"})
        assert registry.lookup(MAC1).hostname == "sn2"
        assert registry.lookup_ip("198.18.0.21") is None
        assert registry.unknown_mac_policy() == UnknownMacPolicy.IGNORE
        await asyncio.to_thread(registry.set_unknown_mac_policy, UnknownMacPolicy.DISCOVER)
        assert registry.unknown_mac_policy() == UnknownMacPolicy.DISCOVER
        registry.record_event(MAC1, "http.script", booting=True)  # queued: the overlay
        assert registry.lookup(MAC1).state == NodeState.BOOTING
        await asyncio.to_thread(registry.set_state, MAC1, NodeState.READY)
        assert registry.lookup(MAC1).state == NodeState.READY  # the later write wins
        await asyncio.to_thread(registry.remove_node, MAC1)
        assert registry.lookup(MAC1) is None
    finally:
        registry.close()


def test_another_process_write_is_seen_within_the_ttl(tmp_path):
    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    clock = Clock()
    registry._cache = ReadCache(ttl=1.0, clock=clock)
    try:
        registry.add_node(NodeSpec(MAC1, "storage", "sn1"))
        assert registry.lookup(MAC1).hostname == "sn1"
        other = sqlite3.connect(tmp_path / "registry.sqlite")
        other.execute("UPDATE nodes SET hostname='elsewhere'")
        other.commit()
        other.close()
        assert registry.lookup(MAC1).hostname == "sn1"
        clock.now += 1.1
        assert registry.lookup(MAC1).hostname == "elsewhere"
    finally:
        registry.close()
