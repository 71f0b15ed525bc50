"""The ``dom0`` role plugin: Xen facts from ``xl info`` and ``xl list -l`` (JSON)."""

from __future__ import annotations

import json
from typing import Any

from nodeagent.plugins import PluginContext, ToolUnavailable, run_tool, unavailable

INT_FIELDS = ("nr_cpus", "nr_nodes", "cores_per_socket", "threads_per_core", "total_memory",
              "free_memory", "sharing_freed_memory", "outstanding_claims")


def parse_xl_info(text: str) -> dict[str, Any]:
    """``xl info``'s ``key : value`` lines, with the Xen version and memory (MiB) as numbers."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    out: dict[str, Any] = {"host": values.get("host"),
                           "xen_caps": values.get("xen_caps", "").split(),
                           "xen_commandline": values.get("xen_commandline")}
    if "xen_major" in values and "xen_minor" in values:
        out["xen_version"] = (f"{values['xen_major']}.{values['xen_minor']}"
                              f"{values.get('xen_extra', '')}")
    else:
        out["xen_version"] = values.get("xen_version")
    for name in INT_FIELDS:
        try:
            out[name] = int(values[name])
        except (KeyError, ValueError):
            continue
    return out


def parse_xl_list_json(text: str) -> list[dict[str, Any]]:
    """Domains from ``xl list -l`` (a JSON array of domain configurations)."""
    data = json.loads(text) if text.strip() else []
    domains = []
    for entry in data if isinstance(data, list) else []:
        config = entry.get("config", {}) if isinstance(entry, dict) else {}
        c_info = config.get("c_info", {})
        b_info = config.get("b_info", {})
        domains.append({
            "domid": entry.get("domid"),
            "name": c_info.get("name"),
            "uuid": c_info.get("uuid"),
            "type": c_info.get("type"),
            "max_memkb": b_info.get("max_memkb"),
            "vcpus": b_info.get("max_vcpus"),
        })
    return domains


async def facts(context: PluginContext) -> dict[str, Any]:
    try:
        info = parse_xl_info(await run_tool(["xl", "info"], context.tool_timeout))
    except ToolUnavailable as exc:
        return unavailable(str(exc))
    try:
        domains: Any = parse_xl_list_json(
            await run_tool(["xl", "list", "-l"], context.tool_timeout))
    except (ToolUnavailable, ValueError) as exc:
        domains = unavailable(str(exc))
    return {"available": True, **info, "domains": domains}
