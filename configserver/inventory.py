"""Inventory files for ``apply -f`` and ``export``: TOML in, TOML out (round-trips).

    [[role]]
    name = "gpu"
    image = "dom0"
    template = "xen"

    [[node]]
    mac = "52:54:00:aa:bb:01"
    role = "storage"
    hostname = "sn1"
    ip = "198.18.0.21"
    tags = ["rack1"]
    nics = [{ mac = "52:54:00:aa:bb:02", ip = "198.18.1.21" }]
"""

from __future__ import annotations

import json
import tomllib
from typing import Any

from configserver.errors import InvalidRequest


def parse_inventory(text: str, *, source: str = "inventory") -> dict[str, list[dict[str, Any]]]:
    """The API body of ``POST /api/v1/apply`` from an inventory file's text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"{source}: not valid TOML: {exc}") from None
    unknown = set(data) - {"node", "role"}
    if unknown:
        raise InvalidRequest(f"{source}: unknown table(s) {', '.join(sorted(unknown))}",
                             hint="an inventory has [[node]] and [[role]] entries")
    nodes, roles = data.get("node", []), data.get("role", [])
    if not isinstance(nodes, list) or not isinstance(roles, list):
        raise InvalidRequest(f"{source}: use [[node]] and [[role]] (arrays of tables)")
    return {"nodes": nodes, "roles": roles}


def _value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def format_inventory(export: dict[str, list[dict[str, Any]]]) -> str:
    """The TOML text of an export (``GET /api/v1/export``)."""
    out = ["# netboot-appliance inventory: configserver apply -f FILE"]
    for table, items in (("role", export.get("roles", [])), ("node", export.get("nodes", []))):
        for item in items:
            out.append("")
            out.append(f"[[{table}]]")
            out.extend(f"{key} = {_value(value)}" for key, value in item.items()
                       if value not in (None, "", []))
    return "\n".join(out) + "\n"
