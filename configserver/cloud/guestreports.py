"""What a dom0 reports of its guests (the ``guests`` and ``xen`` parts of its report), parsed
and applied to the instances' actual state and usage (pure).

Only the claim holder's report of the claim's epoch counts: a late report from a dom0 that
gave the claim back, or of an older epoch, changes nothing. A report of the domain gone
releases the claim only if it follows work that carried the stop (its generation at least the
instance's ``desired_generation``): a report from a pass that had not seen the stop yet says
nothing about what the holder does next.

Usage (CPU seconds, network and disk bytes) accumulates across the guest's reboots and moves:
a domain's counters start again at zero with each new domain (its vifs and its block backend
are new), so the server adds what grew since the last report of the same domain, and all of
a new domain's count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from configserver.cloud.instances import Desired, Instance
from configserver.errors import InvalidReport

RUNNING = ("running", "blocked", "paused")
STATES = (*RUNNING, "stopped", "shutdown", "crashed", "dying")
# The counters a report carries per guest, as the guest sees them (``net_rx_bytes``: what it
# received); the instance's ``usage`` holds their totals under the same names.
COUNTERS = ("cpu_seconds", "net_rx_bytes", "net_tx_bytes", "disk_read_bytes",
            "disk_write_bytes")


@dataclass(frozen=True)
class GuestState:
    id: str
    epoch: int
    state: str
    domid: int | None = None
    cpu_seconds: float | None = None
    error: str | None = None
    counters: dict[str, float] = field(default_factory=dict)  # of this domain, from zero


def _number(item: Mapping[str, Any], key: str) -> float | None:
    value = item.get(key)
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int | float) or value < 0
            or not math.isfinite(value)):
        raise InvalidReport(f"dom0.guests: {key} must be a number >= 0, not {value!r:.40}")
    return float(value)


def parse_guests(body: Mapping[str, Any]
                 ) -> tuple[dict[str, Any] | None, list[GuestState], list[dict[str, Any]]]:
    """(xen facts, guest states, events) of a dom0 report's body; InvalidReport if
    malformed."""
    xen = body.get("xen")
    if xen is not None and not isinstance(xen, dict):
        raise InvalidReport("dom0.xen must be an object")
    for key in ("guests", "events"):
        if body.get(key) is not None and not isinstance(body.get(key), list):
            raise InvalidReport(f"dom0.{key} must be a list")
    events = body.get("events") or []
    if not all(isinstance(item, dict) for item in events):
        raise InvalidReport("each of dom0.events must be an object")
    found = []
    for item in body.get("guests") or ():
        if not isinstance(item, dict):
            raise InvalidReport("each of dom0.guests must be an object")
        epoch, domid = item.get("epoch"), item.get("domid")
        if (not isinstance(item.get("id"), str) or isinstance(epoch, bool)
                or not isinstance(epoch, int) or item.get("state") not in STATES
                or (domid is not None and not isinstance(domid, int))):
            raise InvalidReport(f"dom0.guests: malformed entry {item!r:.200}")
        counters = {k: v for k in COUNTERS if (v := _number(item, k)) is not None}
        error = item.get("error")
        found.append(GuestState(item["id"], epoch, item["state"], domid,
                                counters.get("cpu_seconds"),
                                str(error)[:1000] if error else None, counters))
    return xen, found, events


def _usage(usage: Mapping[str, Any], guest: GuestState) -> dict[str, Any]:
    """The instance's usage with what grew since its last report of the same domain."""
    if guest.domid is None or not guest.counters:
        return dict(usage)
    same = usage.get("domid") == guest.domid and usage.get("epoch") == guest.epoch
    last = dict(usage.get("last") or {})
    if "last_cpu" in usage and "cpu_seconds" not in last:  # what schema 6's usage kept
        last["cpu_seconds"] = usage["last_cpu"]
    new = {k: v for k, v in usage.items() if k != "last_cpu"}
    for name, value in guest.counters.items():
        before = float(last.get(name) or 0.0) if same else 0.0
        grown = value - before if value >= before else value
        total = float(usage.get(name) or 0.0) + grown
        new[name] = round(total, 3) if name == "cpu_seconds" else int(total)
        last[name] = value
    return {**new, "domid": guest.domid, "epoch": guest.epoch, "last": last}


def apply_guests(instances: Sequence[Instance], mac: str, guests: Sequence[GuestState],
                 seen: int | None = None) -> list[tuple[Instance, list[str], bool]]:
    """For each instance this report changes: (new instance, timeline stages, whether its
    claim is to be released: wanted stopped, and reported stopped by its holder after work
    of generation ``seen``, which carried the stop)."""
    by_id = {g.id: g for g in guests}
    changes = []
    for instance in instances:
        guest = by_id.get(instance.id)
        held = instance.claim
        if guest is None or held is None or held.node != mac or held.epoch != guest.epoch:
            continue
        actual = ("running" if guest.state in ("running", "blocked") else guest.state
                  if guest.state in RUNNING else "stopped")
        usage = _usage(instance.usage, guest)
        release = (instance.desired != Desired.RUNNING and actual == "stopped"
                   and seen is not None and seen >= instance.desired_generation)
        if actual == instance.actual and usage == instance.usage and not release:
            continue
        stages = [f"guest.{actual}"] if actual != instance.actual else []
        changes.append((replace(instance, actual=actual, usage=usage), stages, release))
    return changes


def totals(usage: Mapping[str, Any]) -> dict[str, float]:
    """The billable totals of an instance's ``usage`` (zero where nothing was counted)."""
    return {name: usage.get(name) or (0.0 if name == "cpu_seconds" else 0)
            for name in COUNTERS}


__all__ = ["COUNTERS", "GuestState", "apply_guests", "parse_guests", "totals"]
