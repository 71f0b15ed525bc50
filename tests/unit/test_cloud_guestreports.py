"""Dom0 reports of guests: only the holder's current epoch counts; CPU seconds add up."""

from __future__ import annotations

import pytest

from configserver.cloud.guestreports import apply_guests, parse_guests, totals
from configserver.cloud.instances import Claim, Desired, Instance
from configserver.cloud.model import MIB
from configserver.errors import InvalidReport

A, B = "52:54:00:00:00:01", "52:54:00:00:00:02"
WEB = Instance(id="0123456789abcdef", name="web", memory=256 * MIB, vcpus=1, volume=None,
               desired=Desired.RUNNING, claim=Claim(A, 2), epoch=2)


def guest(state="blocked", epoch=2, domid=7, cpu=1.5):
    return {"id": WEB.id, "domain": "nb-web", "epoch": epoch, "state": state, "domid": domid,
            "cpu_seconds": cpu, "memory_mib": 256, "error": None}


def test_parse_refuses_malformed_entries():
    xen, guests, events = parse_guests({"xen": {"free_memory_mib": 1}, "guests": [guest()],
                                        "events": [{"stage": "created"}]})
    assert xen == {"free_memory_mib": 1} and guests[0].cpu_seconds == 1.5
    assert events == [{"stage": "created"}]
    for bad in ({"guests": [guest(state="exploded")]}, {"guests": [{**guest(), "epoch": "2"}]},
                {"guests": ["x"]}, {"xen": []}, {"guests": 5}, {"guests": {"a": 1}},
                {"events": 5}, {"events": ["created"]}):
        with pytest.raises(InvalidReport):
            parse_guests(bad)


def test_only_the_holders_current_epoch_counts():
    _, guests, _ = parse_guests({"guests": [guest()]})
    assert apply_guests([WEB], B, guests) == []
    _, old, _ = parse_guests({"guests": [guest(epoch=1)]})
    assert apply_guests([WEB], A, old) == []
    [(changed, stages, release)] = apply_guests([WEB], A, guests)
    assert changed.actual == "running" and stages == ["guest.running"] and not release


def test_a_stopped_guest_wanted_stopped_releases_the_claim_once_the_stop_was_seen():
    """The stop made generation 8: only a report following work of generation 8 or later
    (the holder had the stop in hand) releases the claim."""
    stopping = Instance(**{**WEB.__dict__, "desired": Desired.STOPPED, "actual": "running",
                           "desired_generation": 8})
    _, guests, _ = parse_guests({"guests": [guest(state="stopped", domid=None, cpu=None)]})
    for before in (None, 7):
        [(changed, stages, release)] = apply_guests([stopping], A, guests, before)
        assert changed.actual == "stopped" and not release
    [(changed, stages, release)] = apply_guests([stopping], A, guests, 8)
    assert changed.actual == "stopped" and release and stages == ["guest.stopped"]


def test_cpu_seconds_never_go_backwards_across_a_new_domain():
    current = WEB
    for domid, cpu, total in ((7, 1.5, 1.5), (7, 4.0, 4.0), (9, 0.5, 4.5), (9, 2.0, 6.0)):
        _, guests, _ = parse_guests({"guests": [guest(domid=domid, cpu=cpu)]})
        [(current, _, _)] = apply_guests([current], A, guests)
        assert current.usage["cpu_seconds"] == total
    _, same, _ = parse_guests({"guests": [guest(domid=9, cpu=2.0)]})
    assert apply_guests([current], A, same) == []  # a repeated report changes nothing


def test_bytes_add_up_across_new_domains_and_never_go_backwards():
    current = WEB
    reports = ((7, 1000, 10, 1000), (7, 1500, 20, 1500), (9, 200, 5, 1700), (9, 300, 5, 1800))
    for domid, rx, written, total in reports:
        _, guests, _ = parse_guests({"guests": [{**guest(domid=domid), "net_rx_bytes": rx,
                                                 "disk_write_bytes": written}]})
        [(current, _, _)] = apply_guests([current], A, guests)
        assert current.usage["net_rx_bytes"] == total
    assert current.usage["disk_write_bytes"] == 25
    assert totals(current.usage) == {"cpu_seconds": 3.0, "net_rx_bytes": 1800,
                                     "net_tx_bytes": 0, "disk_read_bytes": 0,
                                     "disk_write_bytes": 25}
    for bad in (-1, "12", True, float("nan"), float("inf")):
        with pytest.raises(InvalidReport):
            parse_guests({"guests": [{**guest(), "net_tx_bytes": bad}]})


def test_a_schema_6_usage_keeps_counting_from_its_last_cpu():
    old = Instance(**{**WEB.__dict__, "usage": {"cpu_seconds": 10.0, "domid": 7, "epoch": 2,
                                                "last_cpu": 4.0}})
    _, guests, _ = parse_guests({"guests": [guest(domid=7, cpu=5.0)]})
    [(changed, _, _)] = apply_guests([old], A, guests)
    assert changed.usage["cpu_seconds"] == 11.0 and "last_cpu" not in changed.usage
