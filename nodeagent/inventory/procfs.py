"""Pure parsers for /proc text: cpuinfo, meminfo, loadavg, uptime."""

from __future__ import annotations

from typing import Any

VIRTUALISATION_FLAGS = ("vmx", "svm")


def _blocks(text: str) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip().lower()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Model, sockets, cores, threads and virtualisation flags from /proc/cpuinfo."""
    processors = [b for b in _blocks(text) if "processor" in b]
    threads = len(processors)
    model = None
    flags: set[str] = set()
    for block in processors:
        model = model or block.get("model name") or block.get("cpu model") \
            or block.get("hardware")
        flags.update(block.get("flags", block.get("features", "")).split())
    sockets = {b.get("physical id", "0") for b in processors}
    cores_seen = {(b.get("physical id", "0"), b["core id"]) for b in processors
                  if "core id" in b}
    cores = len(cores_seen) or threads
    return {
        "model": model,
        "sockets": len(sockets) if threads else 0,
        "cores": cores,
        "threads": threads,
        "virtualisation": sorted(flags.intersection(VIRTUALISATION_FLAGS)),
        "under_hypervisor": "hypervisor" in flags,
    }


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` values in bytes, keyed in snake case (total, available, free...)."""
    names = {"MemTotal": "total_bytes", "MemAvailable": "available_bytes",
             "MemFree": "free_bytes", "SwapTotal": "swap_total_bytes"}
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in names:
            parts = rest.split()
            try:
                value = int(parts[0])
            except (IndexError, ValueError):
                continue
            out[names[key]] = value * 1024 if parts[1:2] == ["kB"] else value
    return out


def parse_loadavg(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split()[:3]]
    except ValueError:
        return []


def parse_uptime(text: str) -> float | None:
    try:
        return float(text.split(maxsplit=1)[0])
    except (IndexError, ValueError):
        return None
