"""What a dom0 does about its guests, decided from the work and ``xl list`` (pure).

The work names only the instances whose claim this dom0 holds, each with its epoch. So:

* a domain named like an instance (``nb-*``) that the work does not name, or whose UUID is
  not the instance's, is destroyed at once: another dom0 may hold its claim, or nobody does;
* an instance wanted running and not running is created when the work says it can be (its
  volume assembled here), once the agent confirmed the claim (node and epoch) with the
  config server just before ``xl create``;
* an instance wanted stopped that still runs is shut down cleanly (then destroyed if it does
  not stop in time), or destroyed at once when the stop is hard (the instance is being
  destroyed); one wanted stopped that is gone is reported gone, which releases the claim on
  the server;
* a running instance whose reboot count is past the one this dom0 last applied is rebooted
  (a fresh create applies every reboot asked before it).

Domains not named like an instance (an operator's own) are left alone, and so are those of
work entries the agent could not read (``kept``): a malformed entry is the server's bug, and
must not cost a running guest.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from nodeagent.roles.xen import DOM0, Domain, GuestSpec

DOMAIN_PREFIX = "nb-"


class Do(enum.StrEnum):
    CREATE = "create"
    SHUTDOWN = "shutdown"
    DESTROY = "destroy"
    REBOOT = "reboot"
    GONE = "gone"  # report only: the instance is stopped here


@dataclass(frozen=True)
class Action:
    do: Do
    name: str  # the domain name
    spec: GuestSpec | None = None
    reason: str = ""


def plan(specs: Sequence[GuestSpec], running: Sequence[Domain],
         rebooted: Mapping[str, int] | None = None,
         kept: Collection[str] = frozenset()) -> list[Action]:
    """The actions that bring ``running`` to ``specs``: destroys first, then shutdowns,
    creates, reboots and reports. ``rebooted``: domain name -> the reboot count this dom0
    last applied to it; ``kept``: domain names left as they are."""
    rebooted = rebooted or {}
    wanted = {s.name: s for s in specs}
    here = {d.name: d for d in running if d.name != DOM0}
    actions: list[Action] = []
    for name, domain in sorted(here.items()):
        spec = wanted.get(name)
        if not name.startswith(DOMAIN_PREFIX) or name in kept:
            continue
        if spec is None:
            actions.append(Action(Do.DESTROY, name, reason="this dom0 holds no claim on it"))
        elif domain.uuid is not None and domain.uuid != spec.uuid:
            actions.append(Action(Do.DESTROY, name, spec,
                                  reason=f"uuid {domain.uuid} is not the instance's"))
    destroyed = {a.name for a in actions}
    for name, spec in sorted(wanted.items()):
        if name in kept:
            continue
        domain = here.get(name)
        present = domain is not None and name not in destroyed and domain.state != "dying"
        if spec.running and not present and (domain is None or name in destroyed):
            if spec.startable:
                actions.append(Action(Do.CREATE, name, spec))
        elif not spec.running and present:
            actions.append(Action(Do.DESTROY if spec.hard else Do.SHUTDOWN, name, spec,
                                  reason="the instance is being destroyed" if spec.hard else ""))
        elif spec.running and present and spec.reboots > rebooted.get(name, spec.reboots):
            actions.append(Action(Do.REBOOT, name, spec))
        elif not spec.running and domain is None:
            actions.append(Action(Do.GONE, name, spec))
    return actions


__all__ = ["DOMAIN_PREFIX", "Action", "Do", "plan"]
