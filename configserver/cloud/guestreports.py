"""What a dom0 reports of its guests (the ``guests`` and ``xen`` parts of its report), parsed
and applied to the instances' actual state and usage (pure).

Only the claim holder's report of the claim's epoch counts: a late report from a dom0 that
gave the claim back, or of an older epoch, changes nothing. A report of the domain gone
releases the claim only if it follows work that carried the stop (its generation at least the
instance's ``desired_generation``): a report from a pass that had not seen the stop yet says
nothing about what the holder does next. CPU seconds accumulate across
the guest's reboots and moves: a domain's counter starts again at zero with each new domain,
so the server adds what grew since the last report of the same domain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from configserver.cloud.instances import Desired, Instance
from configserver.errors import InvalidReport

RUNNING = ("running", "blocked", "paused")
STATES = (*RUNNING, "stopped", "shutdown", "crashed", "dying")


@dataclass(frozen=True)
class GuestState:
    id: str
    epoch: int
    state: str
    domid: int | None = None
    cpu_seconds: float | None = None
    error: str | None = None


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
        epoch, domid, cpu = item.get("epoch"), item.get("domid"), item.get("cpu_seconds")
        if (not isinstance(item.get("id"), str) or isinstance(epoch, bool)
                or not isinstance(epoch, int) or item.get("state") not in STATES
                or (domid is not None and not isinstance(domid, int))
                or (cpu is not None and not isinstance(cpu, int | float))):
            raise InvalidReport(f"dom0.guests: malformed entry {item!r:.200}")
        error = item.get("error")
        found.append(GuestState(item["id"], epoch, item["state"], domid,
                                float(cpu) if cpu is not None else None,
                                str(error)[:1000] if error else None))
    return xen, found, events


def _usage(usage: Mapping[str, Any], guest: GuestState) -> dict[str, Any]:
    total = float(usage.get("cpu_seconds") or 0.0)
    if guest.cpu_seconds is None or guest.domid is None:
        return dict(usage)
    same = usage.get("domid") == guest.domid and usage.get("epoch") == guest.epoch
    last = float(usage.get("last_cpu") or 0.0) if same else 0.0
    grown = guest.cpu_seconds - last if guest.cpu_seconds >= last else guest.cpu_seconds
    return {**usage, "cpu_seconds": round(total + grown, 3), "domid": guest.domid,
            "epoch": guest.epoch, "last_cpu": guest.cpu_seconds}


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


__all__ = ["GuestState", "apply_guests", "parse_guests"]
