"""Volumes' pure parts: sizes, names, derived names and CHAP, placement."""

from __future__ import annotations

import pytest

from configserver.cloud.model import (
    LEG_OVERHEAD,
    MIB,
    Leg,
    Volume,
    chap_secret,
    chap_user,
    format_size,
    initiator_iqn,
    parse_size,
    validate_volume_name,
)
from configserver.cloud.placement import StorageNode, place, reported_free
from configserver.errors import InvalidSize, InvalidVolumeName, NoRoom, TooFewStorageNodes

GIB = 1 << 30


@pytest.mark.parametrize(("text", "size"), [
    ("2G", 2 * GIB), ("512M", 512 * MIB), ("1T", 1 << 40), ("2g", 2 * GIB),
    ("2GiB", 2 * GIB), ("2GB", 2 * GIB), ("1.5G", 1536 * MIB), (" 64 M ", 64 * MIB),
    ("1048576", MIB), (1048576, MIB), ("1", MIB), (5 * MIB + 1, 6 * MIB), ("1K", MIB),
    ("0.1M", MIB),
])
def test_sizes_parse_in_binary_units_rounded_up_to_a_mib(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", 0, "0G", "-1G", -5, "", "2X", "G", "two", None,
                                  True, 2.5, "1.G", "3P2", "2048P"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(InvalidSize):
        parse_size(text)


def test_format_size():
    assert format_size(2 * GIB) == "2 GiB"
    assert format_size(int(3.9 * GIB)) == "3.9 GiB"
    assert format_size(512 * MIB) == "512 MiB"
    assert format_size(10) == "10 B"


@pytest.mark.parametrize("name", ["a", "db-1", "0", "x" * 63, "a-"])
def test_good_names(name):
    assert validate_volume_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "A", "a_b", "a.b", "x" * 64, None, 3, "é"])
def test_bad_names(name):
    with pytest.raises(InvalidVolumeName):
        validate_volume_name(name)


def test_chap_is_deterministic_per_key_volume_and_dom0():
    mac = "52:54:00:aa:bb:01"
    first = chap_secret(b"k" * 32, "0123456789abcdef", mac)
    assert first == chap_secret(b"k" * 32, "0123456789abcdef", mac)
    assert len(first) == 24
    assert first != chap_secret(b"j" * 32, "0123456789abcdef", mac)
    assert first != chap_secret(b"k" * 32, "0123456789abcdee", mac)
    assert first != chap_secret(b"k" * 32, "0123456789abcdef", "52:54:00:aa:bb:02")
    assert chap_user(mac) == "node-525400aabb01"
    assert initiator_iqn(mac) == "iqn.2026-12.net.netboot:node-525400aabb01"
    volume = Volume("0123456789abcdef", "v", GIB)
    assert volume.lv == "nb-0123456789abcdef"
    assert volume.target == "iqn.2026-12.net.netboot:vol-0123456789abcdef"
    assert volume.leg_size == GIB + 4 * MIB


def test_reported_free_is_the_vg_else_the_empty_disks():
    assert reported_free(None) == 0
    assert reported_free({"vg": {"free": 7}, "disks": [{"size": 99, "state": "empty"}]}) == 7
    assert reported_free({"vg": None, "disks": [
        {"size": 5, "state": "empty"}, {"size": 6, "state": "foreign"},
        {"size": 7, "state": "empty"}, {"size": 8, "state": "ours"}]}) == 12


def nodes(**free):
    return [StorageNode(f"52:54:00:00:00:0{i}", name, amount)
            for i, (name, amount) in enumerate(free.items())]


def test_placement_takes_the_two_with_most_room():
    a, b, c = nodes(a=10 * GIB, b=30 * GIB, c=20 * GIB)
    assert place(GIB, [a, b, c], []) == (b.mac, c.mac)


def test_placement_ties_go_to_the_lower_mac():
    a, b, c = nodes(a=10 * GIB, b=10 * GIB, c=10 * GIB)
    assert place(GIB, [c, b, a], []) == (a.mac, b.mac)


def test_placement_counts_legs_not_yet_in_the_vg():
    a, b, c = nodes(a=10 * GIB, b=10 * GIB, c=9 * GIB)
    placed = [Volume("0" * 16, "old", 2 * GIB, legs=(Leg(a.mac), Leg(b.mac, "exported")))]
    # a loses 2 GiB + 4 MiB to the pending leg; b's exported leg is in its VG's free space.
    assert place(GIB, [a, b, c], placed) == (b.mac, c.mac)


def test_placement_needs_room_on_the_second_node_for_the_leg_and_its_metadata():
    a, b = nodes(a=100 * GIB, b=2 * GIB + LEG_OVERHEAD)
    assert place(2 * GIB, [a, b], []) == (a.mac, b.mac)
    a, b = nodes(a=int(3.9 * GIB), b=int(1.2 * GIB))
    with pytest.raises(NoRoom) as caught:
        place(2 * GIB, [a, b], [])
    assert caught.value.message.startswith(
        "2 GiB does not fit: the two storage nodes with most room have 3.9 GiB and 1.2 GiB "
        "free")
    a, b = nodes(a=100 * GIB, b=2 * GIB + LEG_OVERHEAD - 1)
    with pytest.raises(NoRoom):
        place(2 * GIB, [a, b], [])


def test_placement_needs_two_ready_nodes_and_says_which_there_are():
    with pytest.raises(TooFewStorageNodes) as caught:
        place(GIB, nodes(a=10 * GIB), [], not_ready=["sn2 (lost)"])
    assert "1 is ready (a)" in caught.value.message
    assert "sn2 (lost)" in caught.value.message
    with pytest.raises(TooFewStorageNodes) as caught:
        place(GIB, [], [])
    assert "none is ready" in caught.value.message
