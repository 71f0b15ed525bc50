"""Placement of instances on dom0s: room, spreading, and refusals that say why."""

from __future__ import annotations

import pytest

from configserver.cloud.instances import Claim, Instance
from configserver.cloud.model import MIB
from configserver.cloud.scheduler import Dom0, choose, free_memory
from configserver.errors import NoRoom

A, B, C = "52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03"


def held(name: str, node: str, memory: int = 256 * MIB, actual: str = "running") -> Instance:
    return Instance(id=name * 4, name=name, memory=memory, vcpus=1, volume=None,
                    claim=Claim(node, 1), epoch=1, actual=actual)


def test_spreads_to_the_dom0_with_fewest_claims():
    dom0s = [Dom0(A, "a", 2048 * MIB), Dom0(B, "b", 1024 * MIB)]
    assert choose(256 * MIB, dom0s, [held("x", A)]) == B
    assert choose(256 * MIB, dom0s, []) == A  # a tie on claims: most room


def test_claims_not_yet_running_count_against_the_room():
    dom0s = [Dom0(A, "a", 512 * MIB)]
    with pytest.raises(NoRoom, match="a: 256 MiB free"):
        choose(384 * MIB, dom0s, [held("x", A, actual="stopped")])
    assert choose(384 * MIB, dom0s, [held("x", A, actual="running")]) == A


def test_refusal_names_every_dom0_and_why():
    dom0s = [Dom0(A, "a", None), Dom0(B, "b", 4096 * MIB, drained=True),
             Dom0(C, "c", 4096 * MIB, ready=False)]
    with pytest.raises(NoRoom) as caught:
        choose(256 * MIB, dom0s, [])
    message = caught.value.message
    assert "a: has not reported its memory yet" in message
    assert "b: drained" in message and "c: not ready" in message
    with pytest.raises(NoRoom, match="there is no dom0"):
        choose(256 * MIB, [], [])


def test_free_memory_from_facts():
    assert free_memory({"free_memory_mib": 1407}) == 1407 * MIB
    assert free_memory({"free_memory_mib": True}) is None
    assert free_memory(None) is None


def test_an_instance_is_placed_by_its_memory_ceiling_and_its_headroom_stays_reserved():
    from dataclasses import replace

    from configserver.cloud.resources import Resources
    from configserver.cloud.scheduler import ceiling

    dom0s = [Dom0(A, "a", 1024 * MIB)]
    growing = replace(held("x", A), resources=Resources(max_memory=768 * MIB))
    assert ceiling(growing) == 768 * MIB and ceiling(held("y", A)) == 256 * MIB
    # Running at 256 MiB (counted by xl), it may still take 512 MiB more: 512 MiB are left.
    assert choose(512 * MIB, dom0s, [growing]) == A
    with pytest.raises(NoRoom, match="a: 512 MiB free"):
        choose(513 * MIB, dom0s, [growing])
    # Not running yet, all of its ceiling counts.
    with pytest.raises(NoRoom, match="a: 256 MiB free"):
        choose(512 * MIB, dom0s, [replace(growing, actual="starting")])
