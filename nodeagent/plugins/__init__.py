"""Role plugins: facts a node reports because of its role (Xen dom0, storage).

A plugin is an async function returning a JSON-able dict. A missing tool makes the plugin (or
one of its parts) report ``{"available": false, "reason": ...}``; nothing here raises into the
agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.errors import AgentError

log = logging.getLogger(__name__)

RolePlugin = Callable[["PluginContext"], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class PluginContext:
    """Where plugins look: the filesystem root, and how long a tool may run."""

    root: Path = Path("/")
    tool_timeout: float = 10.0


class ToolUnavailable(AgentError):
    """The tool is not installed, failed, or did not answer in time."""


async def run_tool(argv: list[str], timeout: float) -> str:
    """Stdout of ``argv``; raises ToolUnavailable with a readable reason on any failure."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise ToolUnavailable(f"{argv[0]} is not installed") from None
    except OSError as exc:
        raise ToolUnavailable(f"cannot run {argv[0]}: {exc}") from None
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        raise ToolUnavailable(f"{argv[0]} did not answer within {timeout:g}s") from None
    finally:
        if process.returncode is None:  # timed out or cancelled: never leave it behind
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    if process.returncode != 0:
        message = stderr.decode(errors="replace").strip().splitlines()
        raise ToolUnavailable(f"{' '.join(argv)} failed ({process.returncode}): "
                              f"{message[-1] if message else 'no message'}")
    return stdout.decode(errors="replace")


def unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


def process_cmdlines(root: Path) -> list[list[str]]:
    """Argument vectors of every running process (``/proc/*/cmdline``)."""
    out = []
    proc = root / "proc"
    try:
        entries = os.listdir(proc)
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            raw = (proc / entry / "cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            out.append([part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")])
    return out


async def role_facts(role: str | None, context: PluginContext) -> dict[str, Any]:
    """The facts of ``role``'s plugin; never raises."""
    from nodeagent.plugins import dom0, storage

    plugins: dict[str, RolePlugin] = {"dom0": dom0.facts, "storage": storage.facts}
    plugin = plugins.get(role or "")
    if plugin is None:
        return {"role": role, "plugin": None}
    try:
        facts = await plugin(context)
    except Exception as exc:
        log.exception("role plugin %s failed", role)
        facts = unavailable(f"plugin error: {type(exc).__name__}: {exc}")
    return {"role": role, "plugin": role, **facts}
