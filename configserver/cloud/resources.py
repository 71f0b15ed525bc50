"""An instance's resource controls (pure): Xen's credit scheduler weight and cap, a rate limit
on what its vifs send, and the ceiling its memory may be ballooned up to.

Set at create, changed while it runs (``PATCH /api/v1/instances/NAME``): the dom0 holding
the claim applies a change to the running guest (``xl sched-credit``, ``xl mem-set``, the vif's
``rate`` in xenstore, which netback follows) and starts it with them next time. The memory
ceiling is the one thing fixed while it runs (Xen sizes the guest's tables for it at create).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from configserver.cloud.model import MIB, parse_size
from configserver.errors import InvalidRequest

DEFAULT_WEIGHT = 256  # Xen's own default
MAX_WEIGHT = 65535
MAX_RATE = 100 * 1000**3 // 8  # 100 Gbit/s, in bytes per second
FIELDS = ("cpu_weight", "cpu_cap", "net_rate", "max_memory")


@dataclass(frozen=True)
class Resources:
    cpu_weight: int = DEFAULT_WEIGHT  # its share of CPU against others (credit scheduler)
    cpu_cap: int = 0  # at most this % of one CPU (100 = one whole CPU); 0: no cap
    net_rate: int = 0  # bytes per second its vifs may send; 0: unlimited
    max_memory: int = 0  # bytes its memory may be ballooned up to; 0: its memory

    def to_json(self) -> dict[str, int]:
        return {"cpu_weight": self.cpu_weight, "cpu_cap": self.cpu_cap,
                "net_rate": self.net_rate, "max_memory": self.max_memory}


def from_json(data: Mapping[str, Any] | None) -> Resources:
    """What the registry stored (no validation: it was validated on the way in)."""
    known = {k: int(v) for k, v in (data or {}).items() if k in FIELDS}
    return Resources(**known)


def _whole(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a whole number from {low} to {high}, "
                             f"not {value!r:.40}")
    return value


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(bit|b)?(?:/s)?\s*$", re.IGNORECASE)
_SI = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_rate(value: object) -> int:
    """Bytes per second from an integer or a rate in network units (powers of 1000):
    "500K", "10M" (bytes), "100Mbit" (bits); 0 or "unlimited": no limit."""
    if value in (0, "0", "unlimited", None):
        return 0
    if isinstance(value, str):
        found = _RATE.match(value)
        if found is None:
            raise InvalidRequest(f"net_rate: not a rate: {value!r:.40}",
                                 hint="bytes per second (125000, 500K, 10M) or bits (100Mbit)")
        number, unit, bits = found.groups()
        rate = int(float(number) * _SI[unit.lower()] / (8 if bits and bits.lower() == "bit"
                                                         else 1))
    else:
        rate = _whole(value, "net_rate", 0, MAX_RATE)
    return _whole(rate, "net_rate", 1000, MAX_RATE)


def updated(current: Resources, changes: Mapping[str, Any], *, memory: int, vcpus: int,
            running: bool) -> Resources:
    """``current`` with ``changes`` (the API's fields) validated against the instance's
    ``memory`` and ``vcpus``; the memory ceiling only while it does not run."""
    new = current
    if "cpu_weight" in changes:
        new = replace(new, cpu_weight=_whole(changes["cpu_weight"], "cpu_weight", 1,
                                             MAX_WEIGHT))
    if "cpu_cap" in changes:
        new = replace(new, cpu_cap=_whole(changes["cpu_cap"], "cpu_cap", 0, 100 * vcpus))
    if "net_rate" in changes:
        new = replace(new, net_rate=parse_rate(changes["net_rate"]))
    if "max_memory" in changes:
        ceiling = changes["max_memory"]
        size = 0 if ceiling in (None, 0) else (
            parse_size(ceiling) if isinstance(ceiling, str) else _whole(
                ceiling, "max_memory", 0, 1 << 40))
        if size and size % MIB:
            raise InvalidRequest("max_memory must be whole MiB")
        if running and size != current.max_memory:
            raise InvalidRequest("the memory ceiling (max_memory) is set while the instance "
                                 "is stopped", hint="stop it, change it, start it again")
        new = replace(new, max_memory=size)
    if new.max_memory and memory > new.max_memory:
        raise InvalidRequest(f"memory {memory // MIB} MiB is above max_memory "
                             f"{new.max_memory // MIB} MiB")
    return new


__all__ = ["DEFAULT_WEIGHT", "FIELDS", "Resources", "from_json", "parse_rate", "updated"]
