"""The vm tier's small boot fixture: a Debian kernel, Xen and a busybox initramfs.

Nothing is installed on the host: the Debian packages are fetched with ``apt-get download`` and
unpacked with ``dpkg-deb -x`` into a cache directory (default ``build/testkernel``), so re-runs
only rebuild the initramfs when its /init changes. The initramfs's /init prints
``NETBOOT-TEST-OK <kernel command line>`` on the console and powers the machine off, which is the
"known status" a vm test waits for on the serial log.

Run ``python tests/vm/testimage.py [DIR]`` to build the image directory by hand.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MARKER = "NETBOOT-TEST-OK"
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = ROOT / "build" / "testkernel"

# The /init of the test initramfs. On a Xen PV dom0 the console is hvc0; both are tried.
INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
xen=no
[ -d /proc/xen ] || [ -e /sys/hypervisor/type ] && xen=$(cat /sys/hypervisor/type 2>/dev/null)
line="{MARKER} hypervisor=$xen $(cat /proc/cmdline)"
echo "$line"
echo "$line" > /dev/console 2>/dev/null
echo "$line" > /dev/ttyS0 2>/dev/null
echo "$line" > /dev/hvc0 2>/dev/null
sleep 1
poweroff -f
"""


class TestImageError(RuntimeError):
    """The fixture could not be built (no package, no network to the apt mirror...)."""


@dataclass(frozen=True)
class TestImage:
    directory: Path
    kernel: Path
    initramfs: Path
    hypervisor: Path
    hypervisor_efi: Path


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise TestImageError(f"{' '.join(argv)} failed: {proc.stderr.strip()[-400:]}")
    return proc.stdout


def _kernel_package() -> str:
    """The current bookworm kernel package named by the linux-image-amd64 metapackage."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    match = re.search(r"Depends:\s*(linux-image-\S+-amd64)", out)
    if not match:
        raise TestImageError("apt-cache names no linux-image-*-amd64 package")
    return match.group(1)


def _xen_package() -> str:
    out = _run(["apt-cache", "pkgnames", "xen-hypervisor-4"])
    names = sorted(n for n in out.split() if n.endswith("-amd64") and "common" not in n)
    if not names:
        raise TestImageError("apt-cache names no xen-hypervisor-4.*-amd64 package")
    return names[-1]


def _fetch_unpacked(package: str, cache: Path) -> Path:
    """Download ``package`` (no install) and unpack it under ``cache/pkg/<package>``."""
    target = cache / "pkg" / package
    if (target / ".unpacked").exists():
        return target
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    os.chmod(debs, 0o777)  # apt's _apt sandbox user writes here
    _run(["apt-get", "download", "-q", package], cwd=debs, timeout=600)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        raise TestImageError(f"apt-get download left no {package}_*.deb")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(found[-1]), str(target)])
    (target / ".unpacked").touch()
    return target


def _drop(unpacked: Path) -> None:
    """Remove an unpacked package and its .deb once the fixture has what it needs."""
    shutil.rmtree(unpacked, ignore_errors=True)
    for deb in (unpacked.parent.parent / "debs").glob(f"{unpacked.name}_*.deb"):
        deb.unlink()


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data); directories have empty data."""
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(header + raw)
        pad(len(header) + len(raw))
        out.write(data)
        pad(len(data))
    return out.getvalue()


def _build_initramfs(busybox: bytes) -> bytes:
    entries = [(d, 0o040755, b"") for d in ("bin", "dev", "proc", "sys", "sbin")]
    entries += [("bin/busybox", 0o100755, busybox), ("init", 0o100755, INIT_SCRIPT.encode())]
    return _cpio_newc(entries)


def build(cache: Path = DEFAULT_CACHE) -> TestImage:
    """Build (or reuse) ``cache/testimage/{vmlinuz,initramfs.img,xen,xen.efi,manifest.json}``."""
    cache = Path(cache)
    image_dir = cache / "testimage"
    image_dir.mkdir(parents=True, exist_ok=True)

    kernel = image_dir / "vmlinuz"
    if not kernel.exists():
        pkg = _fetch_unpacked(_kernel_package(), cache)
        found = sorted((pkg / "boot").glob("vmlinuz-*"))
        if not found:
            raise TestImageError(f"no /boot/vmlinuz-* in {pkg}")
        shutil.copyfile(found[-1], kernel)
        _drop(pkg)  # ~400 MB of modules the fixture never uses

    hypervisor = image_dir / "xen"
    hypervisor_efi = image_dir / "xen.efi"  # the same build's EFI loader, for UEFI machines
    if not hypervisor.exists() or not hypervisor_efi.exists():
        pkg = _fetch_unpacked(_xen_package(), cache)
        found = sorted((pkg / "boot").glob("xen-4*.gz"))
        found_efi = sorted((pkg / "boot").glob("xen-4*.efi"))
        if not found or not found_efi:
            raise TestImageError(f"no /boot/xen-*.gz and xen-*.efi in {pkg}")
        hypervisor.write_bytes(gzip.decompress(found[-1].read_bytes()))
        shutil.copyfile(found_efi[-1], hypervisor_efi)
        _drop(pkg)

    initramfs = image_dir / "initramfs.img"
    stamp = image_dir / ".init.sha256"
    digest = hashlib.sha256(INIT_SCRIPT.encode()).hexdigest()
    if not initramfs.exists() or not stamp.exists() or stamp.read_text() != digest:
        pkg = _fetch_unpacked("busybox-static", cache)
        busybox = (pkg / "bin" / "busybox").read_bytes()
        with tempfile.NamedTemporaryFile(dir=image_dir, delete=False) as tmp:
            tmp.write(_build_initramfs(busybox))
        os.replace(tmp.name, initramfs)
        os.chmod(initramfs, 0o644)
        stamp.write_text(digest)

    files = {}
    for path in (kernel, initramfs, hypervisor, hypervisor_efi):
        data = path.read_bytes()
        files[path.name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"name": "testimage", "kernel": "vmlinuz", "initramfs": "initramfs.img",
                "hypervisor": "xen", "hypervisor_efi": "xen.efi", "files": files}
    (image_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return TestImage(image_dir, kernel, initramfs, hypervisor, hypervisor_efi)


if __name__ == "__main__":
    image = build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE)
    print(image.directory)
