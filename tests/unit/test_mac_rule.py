"""One MAC rule for the config server and the agent (netbootmac)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import netbootmac
from configserver.errors import InvalidMac
from configserver.model import normalize_mac as server_mac
from nodeagent.config import normalize_mac as agent_mac
from nodeagent.errors import ConfigError

SPELLINGS = ["52:54:00:AA:bb:01", "52-54-00-aa-bb-01", "5254.00aa.bb01", "525400aabb01",
             "01-52-54-00-aa-bb-01", "52:54:0:aa:bb:1"]


@pytest.mark.parametrize("text", SPELLINGS)
def test_every_spelling_normalises_alike_on_both_sides(text):
    assert server_mac(text) == agent_mac(text) == "52:54:00:aa:bb:01"


@pytest.mark.parametrize("text", ["01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00",
                                  "52:54:00:aa:bb", "52:54:00:aa:bb:01:02", "zz:54:00:aa:bb:01",
                                  "5254.00aa.bb01.0000", "52:54:00:aa:bb:0100"])
def test_both_sides_refuse_what_no_nic_sends_from(text):
    with pytest.raises(InvalidMac):
        server_mac(text)
    with pytest.raises(ConfigError) as refused:
        agent_mac(text)
    assert refused.value.hint


def _spelled(octets: list[int], style: int) -> str:
    hexes = [f"{o:02x}" for o in octets]
    if style == 0:
        return ":".join(hexes)
    if style == 1:
        return "-".join(hexes).upper()
    if style == 2:
        joined = "".join(hexes)
        return ".".join(joined[i:i + 4] for i in range(0, 12, 4))
    return "".join(hexes)


@given(st.lists(st.integers(0, 255), min_size=6, max_size=6), st.integers(0, 3))
def test_any_unicast_mac_round_trips_in_every_spelling(octets, style):
    text = _spelled(octets, style)
    canonical = ":".join(f"{o:02x}" for o in octets)
    if octets[0] & 1 or not any(octets):
        with pytest.raises(netbootmac.MacError):
            netbootmac.normalize_mac(text)
    else:
        assert server_mac(text) == agent_mac(text) == canonical


@given(st.text(max_size=40))
def test_server_and_agent_agree_on_any_text(text):
    try:
        server = server_mac(text)
    except InvalidMac:
        server = None
    try:
        agent = agent_mac(text)
    except ConfigError:
        agent = None
    assert server == agent
