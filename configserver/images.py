"""The catalog of bootable images: what the image builds put in the images directory.

Each image is a directory ``<images>/<name>/`` with a ``manifest.json`` naming its kernel,
initramfs and (for Xen) hypervisor, the hypervisor's EFI binary for UEFI machines
(``hypervisor_efi``), and every file it ships. Only files the manifest names are ever served,
so no path of a caller's choosing reaches the filesystem. A directory without a manifest is
read by convention (``vmlinuz``, ``initramfs.img``, ``xen``, ``xen.efi``, ``rootfs.img``).
An image may also ship a root file system for volumes (manifest key ``rootfs``, a file name;
by convention ``rootfs.img``): a volume created from the image starts as a copy of it. Manifests are
re-read only when their modification time changes, so a rebuilt image is served at once.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CONVENTION = {
    "kernel": ("vmlinuz",),
    "initramfs": ("initramfs.img", "initrd.img", "initramfs"),
    "hypervisor": ("xen", "xen.gz"),
    "hypervisor_efi": ("xen.efi",),
    "rootfs": ("rootfs.img",),
}


@dataclass(frozen=True)
class Image:
    name: str
    directory: Path
    kernel: str
    initramfs: str
    hypervisor: str | None = None
    files: frozenset[str] = frozenset()
    manifest: dict[str, Any] = field(default_factory=dict, compare=False)
    # Xen's EFI loader (xen.efi) of the same build: what a UEFI machine boots, since iPXE's EFI
    # build has no multiboot.
    hypervisor_efi: str | None = None
    # A root file system image for volumes (a raw file system or disk image).
    rootfs: str | None = None

    def path(self, filename: str) -> Path | None:
        """The file's path if the image ships it, else None (no other path is reachable)."""
        if filename not in self.files:
            return None
        return self.directory / filename

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kernel": self.kernel, "initramfs": self.initramfs,
                "hypervisor": self.hypervisor, "hypervisor_efi": self.hypervisor_efi,
                "rootfs": self.rootfs, "files": sorted(self.files),
                "built": self.manifest.get("built")}


class ImageCatalog:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._cache: dict[str, tuple[float, Image | None]] = {}

    def get(self, name: str) -> Image | None:
        if not _NAME.match(name):
            return None
        directory = self.root / name
        manifest = directory / "manifest.json"
        try:
            stamp = manifest.stat().st_mtime if manifest.exists() else directory.stat().st_mtime
        except OSError:
            return None
        cached = self._cache.get(name)
        if cached and cached[0] == stamp:
            return cached[1]
        image = _read(name, directory, manifest)
        self._cache[name] = (stamp, image)
        return image

    def list(self) -> list[Image]:
        try:
            names = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        except OSError:
            return []
        return [img for img in (self.get(n) for n in names) if img is not None]


def _read(name: str, directory: Path, manifest: Path) -> Image | None:
    if manifest.exists():
        try:
            data = json.loads(manifest.read_text())
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            files = data.get("files", {})
            names = frozenset(files if isinstance(files, dict | list) else ())
            kernel, initramfs = data["kernel"], data["initramfs"]
            hypervisor, efi = data.get("hypervisor"), data.get("hypervisor_efi")
            rootfs = data.get("rootfs")
            if not all(isinstance(v, str) for v in (kernel, initramfs, hypervisor or "",
                                                    efi or "", rootfs or "")):
                raise TypeError("kernel, initramfs, hypervisor(_efi) and rootfs are file "
                                "names")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("image %s: unreadable manifest %s: %s", name, manifest, exc)
            return None
        wanted = {kernel, initramfs} | {h for h in (hypervisor, efi, rootfs) if h}
        names = frozenset(n for n in names | wanted if _NAME.match(str(n)))
        return Image(name, directory, kernel, initramfs, hypervisor, names, data,
                     hypervisor_efi=efi or None, rootfs=rootfs or None)
    found: dict[str, str | None] = {}
    for part, candidates in _CONVENTION.items():
        found[part] = next((c for c in candidates if (directory / c).is_file()), None)
    if not found["kernel"] or not found["initramfs"]:
        return None
    files = frozenset(v for v in found.values() if v)
    return Image(name, directory, found["kernel"], found["initramfs"],  # type: ignore[arg-type]
                 found["hypervisor"], files, {}, hypervisor_efi=found["hypervisor_efi"],
                 rootfs=found["rootfs"])
