#!/usr/bin/env python3
"""Build the Xen hypervisor from Debian's own source with shadow paging, for the dom0 image.

Why: a PV guest's live migration needs log-dirty mode, which for PV guests is shadow paging.
Debian builds its hypervisor without ``CONFIG_SHADOW_PAGING`` (its ``xen-4.17-amd64.config``
says "is not set"), so ``xl migrate`` of a PV guest fails there with "Failed to enable
logdirty: 95". Machines with hardware paging (EPT/NPT) can run PVH guests and migrate them
with Debian's hypervisor; machines (and the QEMU farm, under TCG) without it cannot, so the
dom0 image carries this build: the same source, the same Debian config
(``debian/xen-kconfig``), one option added. The trade-off: shadow paging is more hypervisor
code reachable by guests (it was disabled by Debian to shrink that surface), and the
hypervisor follows the newest source the package mirror serves rather than the binary
package's updates. The dom0 image pins the toolstack (``xen-utils``, the libraries) to the
same version, so hypervisor and tools always match.

Steps, each skipped when its result is there: a private apt state under ``build/cache/xen``
(``deb-src`` lines made from the host's ``deb`` sources; the host's apt is left alone); the
newest source version of ``xen`` whose files the mirror serves (``apt-get source``); the
hypervisor (``make xen`` with the Debian config plus ``CONFIG_SHADOW_PAGING=y``); the result
in ``build/xen/shadow/``: ``xen.gz``, ``xen.efi``, ``config`` and ``version``. About 3 min on
two cores; later runs take a second.

Stdlib only, like ``images/build.py``::

    .venv/bin/python images/xenshadow.py [--out build/xen/shadow]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import host_apt_sources

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "cache" / "xen"
OUT = REPO / "build" / "xen" / "shadow"
RELEASE = "bookworm"
# What this build adds to Debian's hypervisor config, and nothing else.
CONFIG_ADDED = ("CONFIG_SHADOW_PAGING=y",)


class XenBuildError(Exception):
    """The hypervisor could not be fetched or built; the message says where."""


def _run(command: list[str], *, cwd: Path | None = None, log: Path | None = None) -> str:
    try:
        if log is None:
            done = subprocess.run(command, cwd=cwd, check=True, text=True,
                                  capture_output=True)
            return done.stdout
        with log.open("w") as out:
            subprocess.run(command, cwd=cwd, check=True, stdout=out, stderr=subprocess.STDOUT)
        return ""
    except FileNotFoundError as exc:
        raise XenBuildError(f"{command[0]} is not installed (make deps)") from exc
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or "").strip().splitlines()[-5:] if log is None else \
            log.read_text(errors="replace").strip().splitlines()[-15:]
        raise XenBuildError(f"{' '.join(command[:3])} failed ({exc.returncode}):\n  "
                            + "\n  ".join(tail)) from exc


def source_lines(release: str, sources: list[tuple[str, str]]) -> list[str]:
    """``deb-src`` lines for ``release``, its updates and security suites, from the host's
    ``deb`` sources (the package mirror it already reaches)."""
    wanted = (release, f"{release}-updates", f"{release}-security")
    lines = []
    for uri, suite in sources:
        if suite in wanted and (line := f"deb-src {uri} {suite} main") not in lines:
            lines.append(line)
    return lines


class Apt:
    """apt-get and apt-cache on a state of their own (lists, archives, source list)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.options = [
            "-o", f"Dir::Etc::SourceList={root / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={root / 'lists'}",
            "-o", f"Dir::Cache={root / 'cache'}",
            "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root", "-q"]

    def update(self, lines: list[str]) -> None:
        if not lines:
            raise XenBuildError(f"the host's apt sources name no {RELEASE} mirror to take "
                                "xen's source from")
        for sub in ("lists/partial", "cache/archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "sources.list").write_text("\n".join(lines) + "\n")
        _run(["apt-get", *self.options, "update"])

    def versions(self) -> list[str]:
        """The source versions of ``xen`` the lists know, newest first."""
        text = _run(["apt-cache", *self.options, "showsrc", "xen"])
        found = {line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("Version:")}

        def newer(a: str, b: str) -> bool:
            done = subprocess.run(["dpkg", "--compare-versions", a, "gt", b], check=False)
            return done.returncode == 0
        ordered: list[str] = []
        for version in found:  # insertion sort by dpkg's order (a handful of versions)
            at = next((i for i, v in enumerate(ordered) if newer(version, v)), len(ordered))
            ordered.insert(at, version)
        return ordered

    def source(self, version: str, where: Path) -> Path | None:
        """``xen`` of ``version`` unpacked under ``where`` (patches applied); None when the
        mirror does not serve its files (some mirrors carry only binary security updates)."""
        where.mkdir(parents=True, exist_ok=True)
        tree = where / f"xen-{version.rsplit('-', 1)[0]}"
        if (tree / "debian" / "xen-kconfig").exists():
            return tree
        try:
            _run(["apt-get", *self.options, "source", f"xen={version}"], cwd=where)
        except XenBuildError as exc:
            if "404" in str(exc) or "Failed to fetch" in str(exc):
                return None
            raise
        return tree if tree.is_dir() else None


def build_hypervisor(tree: Path, log: Path) -> Path:
    """``make xen`` in ``tree`` with Debian's config plus ``CONFIG_ADDED``; the xen dir."""
    xen = tree / "xen"
    if (xen / "xen.gz").exists() and (xen / "xen.efi").exists():
        return xen
    config = (tree / "debian" / "xen-kconfig").read_text()
    (xen / ".config").write_text(config.rstrip("\n") + "\n" + "\n".join(CONFIG_ADDED) + "\n")
    args = ["XEN_TARGET_ARCH=x86_64", "XEN_COMPILE_ARCH=x86_64"]
    _run(["make", "-C", "xen", "olddefconfig", *args], cwd=tree, log=log)
    made = (xen / ".config").read_text().splitlines()
    for line in CONFIG_ADDED:
        if line not in made:
            raise XenBuildError(f"{line} did not survive olddefconfig (see {log})")
    _run(["make", f"-j{os.cpu_count() or 2}", "xen", *args], cwd=tree, log=log)
    for name in ("xen.gz", "xen.efi"):
        if not (xen / name).exists():
            raise XenBuildError(f"the build made no {name} (an EFI-capable ld is needed; "
                                f"see {log})")
    return xen


def publish(xen: Path, version: str, out: Path) -> None:
    staging = out.with_name(out.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copy2(xen / "xen.gz", staging / "xen.gz")
    shutil.copy2(xen / "xen.efi", staging / "xen.efi")
    shutil.copy2(xen / ".config", staging / "config")
    (staging / "version").write_text(version + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--release", default=RELEASE)
    args = parser.parse_args(argv)
    try:
        apt = Apt(CACHE / "apt")
        apt.update(source_lines(args.release, host_apt_sources()))
        versions = apt.versions()
        if not versions:
            raise XenBuildError("the mirror lists no source of xen")
        for version in versions:
            if (args.out / "version").exists() and \
                    (args.out / "version").read_text().strip() == version:
                print(f"xen {version} with shadow paging: already built in {args.out}")
                return 0
            tree = apt.source(version, CACHE / "src")
            if tree is None:
                print(f"xen {version}: its source is not served by the mirror; trying the "
                      "next", file=sys.stderr)
                continue
            print(f"building xen {version} with shadow paging (log: {CACHE / 'build.log'})")
            publish(build_hypervisor(tree, CACHE / "build.log"), version, args.out)
            print(f"xen {version} with shadow paging: {args.out}")
            return 0
        raise XenBuildError("no source version of xen could be fetched: "
                            + ", ".join(versions))
    except XenBuildError as exc:
        print(f"xenshadow: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
