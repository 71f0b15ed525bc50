"""``configserver instance migrate NAME [--to DOM0] [--wait]``: a live migration, and with
``--wait`` its progress (one line on a terminal: the phase and the time) until the guest runs
on the target, or the reason it stayed where it was."""

from __future__ import annotations

import time
from typing import Any

from configserver.cli.format import StatusLine
from configserver.errors import Conflict, ServerUnavailable
from configserver.http.client import ApiClient

POLL = 0.5
PHASES = {"preparing": "the target prepares its receiver",
          "sending": "the guest's memory is being sent",
          "released": "the source let go of the disk; the target resumes the guest"}


def _last_failure(item: dict[str, Any], since: float) -> str | None:
    for event in reversed(item.get("timeline") or []):
        if event.get("time", 0) < since:
            break
        if event.get("stage") == "migrate.failed":
            return str((event.get("detail") or {}).get("error") or "failed")
    return None


def migrate(client: ApiClient, path: str, to: str | None, *, wait: bool,
            timeout: float = 900.0, status: StatusLine | None = None) -> tuple[dict[str, Any],
                                                                               str]:
    """Ask for the migration; with ``wait``, follow it. (the instance, a line saying what
    happened); Conflict if it failed (the guest runs on where it was)."""
    began = time.time()
    item = client.post(f"{path}/migrate", {"to": to} if to else {})
    moving = item.get("migration") or {}
    source, target = moving.get("source"), moving.get("target")
    if not wait:
        return item, f"instance {item['name']}: moving from {source} to {target}"
    line = status or StatusLine()
    deadline = time.monotonic() + timeout
    try:
        while True:
            item = client.get(path)
            moving = item.get("migration")
            if moving is None:
                break
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"instance {item['name']} is still moving after "
                                        f"{timeout:.0f} s ({moving.get('phase')})",
                                        hint=f"configserver instance show {item['name']}")
            line.show(f"{item['name']}: {PHASES.get(moving.get('phase'), moving.get('phase'))}"
                      f" ({time.time() - began:.0f} s)")
            time.sleep(POLL)
    finally:
        line.close()
    if item.get("node") != target:
        why = _last_failure(item, began) or "it did not arrive"
        raise Conflict(f"instance {item['name']} was not migrated: {why}",
                       hint=f"it runs on where it was; see 'configserver instance show "
                            f"{item['name']}'")
    return item, (f"instance {item['name']} moved from {source} to {target} in "
                  f"{time.time() - began:.0f} s")


__all__ = ["migrate"]
