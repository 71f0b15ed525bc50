"""Instances' pure parts: names, memory, MACs, addresses and the guest map's claims."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from configserver.cloud.instances import (
    Claim,
    Desired,
    Instance,
    claim,
    domain_name,
    domain_uuid,
    holds,
    new_mac,
    pick_ip,
    release,
    validate_instance_name,
    validate_memory,
    validate_vcpus,
)
from configserver.cloud.model import MIB
from configserver.errors import ClaimHeld, InvalidRequest, InvalidSize, InvalidVolumeName

DOM0S = ("52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03")


def instance(**changes) -> Instance:
    base = Instance(id="0123456789abcdef", name="web", memory=256 * MIB, vcpus=1,
                    volume="fedcba9876543210")
    return Instance(**{**base.__dict__, **changes})


@pytest.mark.parametrize("name", ["web", "a", "db-1", "x" * 40])
def test_valid_names(name):
    assert validate_instance_name(name) == name


@pytest.mark.parametrize("name", ["", "Web", "-web", "web_1", "x" * 41, None, 3, "we b"])
def test_invalid_names(name):
    with pytest.raises(InvalidVolumeName):
        validate_instance_name(name)


def test_memory_bounds():
    assert validate_memory(64 * MIB) == 64 * MIB
    with pytest.raises(InvalidSize, match="at least 64 MiB"):
        validate_memory(63 * MIB)
    with pytest.raises(InvalidSize):
        validate_memory((1 << 40) + MIB)


@pytest.mark.parametrize("vcpus", [0, -1, 129, True, "2", 1.5])
def test_invalid_vcpus(vcpus):
    with pytest.raises(InvalidRequest):
        validate_vcpus(vcpus)


def test_domain_names_and_uuids_are_stable():
    assert domain_name("web") == "nb-web"
    assert domain_uuid("0123456789abcdef") == domain_uuid("0123456789abcdef")
    assert domain_uuid("0123456789abcdef") != domain_uuid("0123456789abcdee")


def test_new_mac_is_xen_and_skips_used():
    tokens = iter([b"\x00\x00\x01", b"\x00\x00\x01", b"\xab\xcd\xef"])
    first = new_mac((), token=lambda n: next(tokens))
    assert first == "00:16:3e:00:00:01"
    assert new_mac({first}, token=lambda n: next(tokens)) == "00:16:3e:ab:cd:ef"


def test_new_mac_gives_up_when_every_draw_is_taken():
    with pytest.raises(InvalidRequest, match="no free MAC"):
        new_mac({"00:16:3e:00:00:01"}, token=lambda n: b"\x00\x00\x01")


def test_pick_ip_lowest_free_pinned_and_errors():
    pool = ("198.18.0.100", "198.18.0.102")
    assert pick_ip(pool, {"198.18.0.100"}) == "198.18.0.101"
    assert pick_ip(pool, (), "198.18.0.102") == "198.18.0.102"
    with pytest.raises(InvalidRequest, match="outside"):
        pick_ip(pool, (), "198.18.0.99")
    with pytest.raises(InvalidRequest, match="is taken"):
        pick_ip(pool, {"198.18.0.101"}, "198.18.0.101")
    with pytest.raises(InvalidRequest, match="not an IPv4"):
        pick_ip(pool, (), "nope")
    with pytest.raises(InvalidRequest, match="full"):
        pick_ip(pool, {"198.18.0.100", "198.18.0.101", "198.18.0.102"})


def test_claim_release_cycle_moves_epoch_forward():
    first = claim(instance(), DOM0S[0])
    assert first.claim == Claim(DOM0S[0], 1) and first.desired == Desired.RUNNING
    assert holds(first, DOM0S[0], 1) and not holds(first, DOM0S[1], 1)
    assert claim(first, DOM0S[0]) == first  # a repeated start changes nothing
    with pytest.raises(ClaimHeld, match="held by"):
        claim(first, DOM0S[1])
    stopping = Instance(**{**first.__dict__, "desired": Desired.STOPPED})
    assert not holds(stopping, DOM0S[0], 1)
    assert release(stopping, DOM0S[1], 1) == stopping  # not the holder
    assert release(stopping, DOM0S[0], 0) == stopping  # an old epoch
    free = release(stopping, DOM0S[0], 1)
    assert free.claim is None
    moved = claim(free, DOM0S[1])
    assert moved.claim == Claim(DOM0S[1], 2)


def test_release_refused_while_wanted_running():
    running = claim(instance(), DOM0S[0])
    assert release(running, DOM0S[0], 1) == running


@given(st.lists(st.tuples(st.sampled_from(("start", "stop", "gone")), st.sampled_from(DOM0S)),
                max_size=60))
def test_guest_map_never_has_two_holders(steps):
    """Any order of starts (naming any dom0), stops and "domain gone" reports: at most one
    dom0 may run the instance, and a claim handed out again never reuses an epoch."""
    current = instance()
    epochs_seen: set[int] = set()
    for action, node in steps:
        if action == "start":
            try:
                current = claim(current, node)
            except ClaimHeld:
                assert current.claim is not None and current.claim.node != node
        elif action == "stop":
            current = Instance(**{**current.__dict__, "desired": Desired.STOPPED})
        elif current.claim is not None:
            current = release(current, node, current.claim.epoch)
        runners = [n for n in DOM0S if current.claim and holds(current, n, current.claim.epoch)]
        assert len(runners) <= 1
        if current.claim is not None:
            assert current.claim.epoch == current.epoch
            epochs_seen.add(current.claim.epoch)
    assert epochs_seen == set(range(1, current.epoch + 1))
