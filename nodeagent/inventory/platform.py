"""Firmware and platform facts: DMI, boot mode, kernel, Xen.

Every reader takes the filesystem root, so tests point it at a recorded tree; a missing or
unreadable file yields ``None`` rather than an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DMI_FIELDS = {"vendor": "sys_vendor", "product": "product_name", "serial": "product_serial",
              "uuid": "product_uuid", "board_vendor": "board_vendor",
              "board_name": "board_name", "bios_vendor": "bios_vendor",
              "bios_version": "bios_version"}


def read_text(path: Path, limit: int = 1 << 20) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(limit)
    except OSError:
        return None


def dmi(root: Path) -> dict[str, str | None]:
    base = root / "sys/class/dmi/id"
    out: dict[str, str | None] = {}
    for name, filename in DMI_FIELDS.items():
        text = read_text(base / filename)
        out[name] = text.strip() or None if text is not None else None
    return out


def boot_mode(root: Path) -> str:
    return "uefi" if (root / "sys/firmware/efi").is_dir() else "bios"


def xen(root: Path) -> dict[str, Any]:
    """Whether the kernel runs on Xen, and whether as the control domain (dom0)."""
    hypervisor = (read_text(root / "sys/hypervisor/type") or "").strip() or None
    capabilities = (read_text(root / "proc/xen/capabilities") or "").split()
    return {"hypervisor": hypervisor, "dom0": "control_d" in capabilities}


def kernel(release: str, version: str, machine: str, cmdline: str | None) -> dict[str, Any]:
    return {"release": release, "version": version, "machine": machine,
            "cmdline": (cmdline or "").strip() or None}
