"""An instance's resource controls: validated on the way in, the memory ceiling fixed while
it runs, rates in bytes or bits."""

from __future__ import annotations

import pytest

from configserver.cloud.model import MIB
from configserver.cloud.resources import Resources, from_json, parse_rate, updated
from configserver.errors import InvalidRequest


def test_rates_in_bytes_or_bits_and_unlimited():
    assert parse_rate("10M") == 10_000_000 and parse_rate("8Mbit") == 1_000_000
    assert parse_rate("500K") == 500_000 and parse_rate("8000bit") == 1000
    assert parse_rate("1.5M/s") == 1_500_000 and parse_rate("1000") == 1000
    assert parse_rate(125_000) == 125_000 and parse_rate(0) == parse_rate("unlimited") == 0
    for bad in ("fast", -1, 10, True, "1000G", "10 MiB", "999"):
        with pytest.raises(InvalidRequest):
            parse_rate(bad)


def test_updated_validates_and_keeps_the_ceiling_while_running():
    base = Resources()
    new = updated(base, {"cpu_weight": 512, "cpu_cap": 150, "net_rate": "1M",
                         "max_memory": "1G"}, memory=256 * MIB, vcpus=2, running=False)
    assert new == Resources(512, 150, 1_000_000, 1024 * MIB)
    assert from_json(new.to_json()) == new and from_json({}) == Resources()
    for bad in ({"cpu_weight": 0}, {"cpu_cap": 201}, {"cpu_weight": "heavy"},
                {"max_memory": "100M"}, {"max_memory": 1000}):
        with pytest.raises(InvalidRequest):
            updated(base, bad, memory=256 * MIB, vcpus=2, running=False)
    with pytest.raises(InvalidRequest, match="while the instance is stopped"):
        updated(new, {"max_memory": "2G"}, memory=256 * MIB, vcpus=2, running=True)
    assert updated(new, {"max_memory": "1G", "cpu_cap": 0}, memory=256 * MIB, vcpus=2,
                   running=True).cpu_cap == 0
    with pytest.raises(InvalidRequest, match="above max_memory"):
        updated(new, {}, memory=2048 * MIB, vcpus=2, running=True)
