"""The ``storage`` role plugin: block devices, LVM, and current exports (LIO, AoE, NBD)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nodeagent.plugins import (
    PluginContext,
    ToolUnavailable,
    process_cmdlines,
    run_tool,
    unavailable,
)

LSBLK = ["lsblk", "--json", "--bytes", "-o", "NAME,PATH,SIZE,TYPE,MOUNTPOINT,FSTYPE"]
VGS = ["vgs", "--reportformat", "json", "--units", "b", "--nosuffix",
       "-o", "vg_name,vg_size,vg_free,lv_count,pv_count"]
LVS = ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
       "-o", "lv_name,vg_name,lv_size,lv_path,lv_attr"]


def parse_lvm_report(text: str, section: str) -> list[dict[str, Any]]:
    """Rows of one section (``vg`` or ``lv``) of an LVM JSON report; sizes become ints."""
    data = json.loads(text)
    rows = []
    for report in data.get("report", []):
        for row in report.get(section, []):
            rows.append({key: _maybe_int(value) for key, value in row.items()})
    return rows


def _maybe_int(value: Any) -> Any:
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def parse_vblade(argv: list[str]) -> dict[str, Any] | None:
    """An AoE export from a ``vblade [options] shelf slot netif file`` command line."""
    if not argv or os.path.basename(argv[0]) not in ("vblade", "vbladed"):
        return None
    args = [a for a in argv[1:] if not a.startswith("-")]
    if len(args) < 4:
        return None
    shelf, slot, netif, path = args[-4:]
    return {"shelf": _maybe_int(shelf), "slot": _maybe_int(slot), "interface": netif,
            "path": path}


def parse_nbd_config(text: str) -> list[dict[str, Any]]:
    """Exports of an nbd-server INI configuration (every section but ``[generic]``)."""
    exports: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for raw_line in text.splitlines():
        line = raw_line.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1].strip()
            current = None if name == "generic" else {"name": name}
            if current is not None:
                exports.append(current)
        elif current is not None and "=" in line:
            key, value = (part.strip() for part in line.split("=", 1))
            if key in ("exportname", "readonly", "port"):
                current["path" if key == "exportname" else key] = value
    return exports


def lio_targets(configfs: Path) -> dict[str, Any]:
    """iSCSI targets, portal groups and LUN backstores from LIO's configfs tree."""
    iscsi = configfs / "iscsi"
    if not configfs.is_dir():
        return unavailable(f"{configfs} not present (target_core_mod not loaded?)")
    targets = []
    for target in sorted(iscsi.iterdir()) if iscsi.is_dir() else []:
        if not target.name.startswith(("iqn.", "naa.", "eui.")):
            continue
        luns = []
        for tpg in sorted(target.glob("tpgt_*")):
            for lun in sorted((tpg / "lun").glob("lun_*")):
                backstores = [os.path.realpath(p) for p in lun.iterdir() if p.is_symlink()]
                backing = None
                for store in backstores:
                    udev_path = Path(store) / "udev_path"
                    if udev_path.exists():
                        backing = udev_path.read_text().strip() or None
                luns.append({"tpg": tpg.name, "lun": lun.name, "backing": backing})
        targets.append({"iqn": target.name, "luns": luns})
    return {"available": True, "targets": targets}


async def facts(context: PluginContext) -> dict[str, Any]:
    out: dict[str, Any] = {"available": True}
    try:
        out["block_devices"] = json.loads(
            await run_tool(LSBLK, context.tool_timeout)).get("blockdevices", [])
    except (ToolUnavailable, ValueError) as exc:
        out["block_devices"] = unavailable(str(exc))
    try:
        out["lvm"] = {
            "available": True,
            "volume_groups": parse_lvm_report(await run_tool(VGS, context.tool_timeout), "vg"),
            "logical_volumes": parse_lvm_report(await run_tool(LVS, context.tool_timeout),
                                                "lv"),
        }
    except (ToolUnavailable, ValueError, AttributeError) as exc:
        out["lvm"] = unavailable(str(exc))
    try:
        out["iscsi"] = lio_targets(context.root / "sys/kernel/config/target")
    except OSError as exc:
        out["iscsi"] = unavailable(f"cannot read LIO configfs: {exc}")
    processes = process_cmdlines(context.root)
    out["aoe"] = {"exports": [e for e in map(parse_vblade, processes) if e]}
    nbd_running = any(os.path.basename(p[0]) == "nbd-server" for p in processes if p)
    nbd_config = context.root / "etc/nbd-server/config"
    try:
        exports = parse_nbd_config(nbd_config.read_text()) if nbd_config.exists() else []
    except OSError:
        exports = []
    out["nbd"] = {"running": nbd_running, "exports": exports}
    return out
