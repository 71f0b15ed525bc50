#!/usr/bin/env python3
"""Build one image from its recipe with diskimage-builder.

A recipe (``images/<role>.toml``) names the elements, the extra Debian packages and the DIB_*
variables of an image, and what the build outputs: a network-boot pair (``output =
"netboot"``, the default) or a root file system for volumes (``output = "rootfs"``). This
driver builds the node agent's wheels (if the image has the agent), runs
``disk-image-create`` with ``ELEMENTS_PATH`` pointing at the project's ``elements/``, then
publishes ``build/images/<role>/`` with ``vmlinuz``, ``initramfs.img``, for Xen images the
uncompressed hypervisor ``xen`` and its EFI binary ``xen.efi`` (for UEFI machines), for a
root file system image ``rootfs.img`` (a raw ext4 file system, no partitions), and
``manifest.json`` (sizes, sha256, elements, packages, versions, build time), replacing the
previous image only once the new one is complete.

On a terminal it shows one line of progress (which of the elements' hooks runs, in which
phase); elsewhere it stays quiet. diskimage-builder's whole output is in
``build/images/<role>.log``; a failed build shows its last lines and where it stopped.

Stdlib only: it runs before anything else is installed. Usage::

    .venv/bin/python images/build.py images/storage.toml
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from dibrun import BuildFailed, run_dib  # images/dibrun.py, beside this file

log = logging.getLogger("images.build")

REPO = Path(__file__).resolve().parent.parent
# Outputs of the elements' cleanup.d scripts (suffixes of disk-image-create's -o name), and the
# names they are published under.
KERNEL, INITRAMFS, HYPERVISOR = "vmlinuz", "initramfs.img", "xen"
HYPERVISOR_EFI = "xen.efi"
ROOTFS = "rootfs.img"
# What a recipe's ``output`` may be: a network-boot pair, or a root file system image (made by
# ``disk-image-create -t raw`` from the element's block-device config) with its kernel and
# initramfs.
OUTPUT_KINDS = ("netboot", "rootfs")
APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")


class BuildError(Exception):
    """A build cannot proceed; the message says why and what to do."""


@dataclass(frozen=True)
class Recipe:
    """What one image is made of, as declared in ``images/<role>.toml``."""

    name: str
    path: Path
    elements: tuple[str, ...]
    packages: tuple[str, ...] = ()
    variables: dict[str, str] = field(default_factory=dict)
    description: str = ""
    output: str = "netboot"


@dataclass(frozen=True)
class BuildPaths:
    """Where a build reads and writes."""

    output: Path  # build/images: one directory per role is published here
    cache: Path  # build/cache: DIB's image cache (debootstrap tarball, apt archives)
    wheelhouse: Path  # the agent's wheels for the netboot-agent element
    agent_unit: Path  # the agent's systemd unit


def load_recipe(path: Path) -> Recipe:
    """Read and check a recipe file."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BuildError(f"cannot read recipe {path}: {exc}") from exc
    name = data.get("name", path.stem)
    elements = data.get("elements")
    if not isinstance(elements, list) or not all(isinstance(e, str) for e in elements):
        raise BuildError(f"{path}: 'elements' must be a list of element names")
    packages = data.get("packages", [])
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
        raise BuildError(f"{path}: 'packages' must be a list of Debian package names")
    variables = data.get("variables", {})
    if not isinstance(variables, dict):
        raise BuildError(f"{path}: [variables] must be a table")
    output = data.get("output", "netboot")
    if output not in OUTPUT_KINDS:
        raise BuildError(f"{path}: 'output' must be one of {', '.join(OUTPUT_KINDS)}, "
                         f"not {output!r}")
    return Recipe(name=str(name), path=path, elements=tuple(elements),
                  packages=tuple(packages),
                  variables={str(k): str(v) for k, v in variables.items()},
                  description=str(data.get("description", "")), output=output)


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas, current, key = [], {}, None
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
        elif line[0].isspace() and key:
            current[key] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            current[key] = value.strip()
    return stanzas


def host_apt_sources(sources_list: Path = APT_SOURCES,
                     sources_dir: Path = APT_SOURCES_DIR) -> list[tuple[str, str]]:
    """The build host's ``deb`` sources as (URI, suite) pairs, in configuration order."""
    pairs: list[tuple[str, str]] = []
    files = [sources_list] if sources_list.is_file() else []
    if sources_dir.is_dir():
        files += sorted(sources_dir.glob("*.list")) + sorted(sources_dir.glob("*.sources"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in _deb822_stanzas(text):
                if "deb" not in stanza.get("types", "").split():
                    continue
                if stanza.get("enabled", "yes").lower() == "no":
                    continue
                for uri in stanza.get("uris", "").split():
                    pairs += [(uri, suite) for suite in stanza.get("suites", "").split()]
            continue
        for line in text.splitlines():
            words = [w for w in line.split("#", 1)[0].split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb":
                pairs.append((words[1], words[2]))
    return pairs


def mirror_variables(release: str, sources: list[tuple[str, str]]) -> dict[str, str]:
    """DIB mirror variables that follow the host's apt configuration for ``release``."""
    found: dict[str, str] = {}
    for uri, suite in sources:
        if suite == release and "DIB_DISTRIBUTION_MIRROR" not in found:
            found["DIB_DISTRIBUTION_MIRROR"] = uri.rstrip("/")
        elif suite == f"{release}-security" and "DIB_DEBIAN_SECURITY_MIRROR" not in found:
            found["DIB_DEBIAN_SECURITY_MIRROR"] = uri.rstrip("/")
    return found


def hypervisor_variables(directory: str) -> dict[str, str]:
    """A hypervisor built from source (``images/xenshadow.py``): its directory made absolute,
    and the version the element pins the toolstack to. Nothing for Debian's hypervisor."""
    if not directory:
        return {}
    path = (REPO / directory).resolve()
    try:
        version = (path / "version").read_text().strip()
    except OSError:
        raise BuildError(f"no hypervisor built in {path} (make xen-shadow builds it)") from None
    if not version or not (path / "xen.gz").is_file() or not (path / "xen.efi").is_file():
        raise BuildError(f"{path} lacks xen.gz, xen.efi or its version (make xen-shadow)")
    return {"DIB_XEN_HYPERVISOR_DIR": str(path), "DIB_XEN_PIN_VERSION": version}


def build_environment(recipe: Recipe, paths: BuildPaths, base: dict[str, str]) -> dict[str, str]:
    """The environment for disk-image-create: host apt mirrors < recipe < caller's environment."""
    bin_dir = str(Path(sys.executable).parent)
    env = dict(recipe.variables)
    release = base.get("DIB_RELEASE", env.get("DIB_RELEASE", "bookworm"))
    for key, value in mirror_variables(release, host_apt_sources()).items():
        env.setdefault(key, value)
    env.update({
        "ELEMENTS_PATH": str(REPO / "elements"),
        "DIB_IMAGE_CACHE": str(paths.cache / "dib"),
        # Reuse the debootstrap result and the downloaded .debs across builds and images.
        "DIB_DEBOOTSTRAP_CACHE": "1",
        "DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE": "1",
    })
    env.update({k: v for k, v in base.items() if k.startswith("DIB_") or k == "ELEMENTS_PATH"})
    env.update(hypervisor_variables(env.get("DIB_XEN_HYPERVISOR_DIR", "")))
    # What this build made or was told on its command line, over anything inherited.
    env.update({
        "DIB_NETBOOT_AGENT_WHEELHOUSE": str(paths.wheelhouse),
        "DIB_NETBOOT_AGENT_UNIT": str(paths.agent_unit),
    })
    merged = dict(base)
    merged.update(env)
    merged["PATH"] = bin_dir + os.pathsep + base.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return merged


AGENT_PROJECT = REPO / "images" / "agent" / "pyproject.toml"
AGENT_PACKAGES = ("nodeagent", "netbootmac")
AGENT_WHEEL_GLOB = "netboot_agent-*.whl"


def stage_agent_source(staging: Path) -> Path:
    """The agent's own source tree: its packages and its pyproject, nothing of the server."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    shutil.copy2(AGENT_PROJECT, staging / "pyproject.toml")
    for package in AGENT_PACKAGES:
        shutil.copytree(REPO / package, staging / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return staging


def build_wheelhouse(wheelhouse: Path, offline: bool) -> None:
    """The agent's wheel plus its dependencies as wheels for the image."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    for old in (*wheelhouse.glob(AGENT_WHEEL_GLOB), *wheelhouse.glob("netboot_appliance-*.whl")):
        old.unlink()
    source = stage_agent_source(wheelhouse.parent / "agent-src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "-w", str(wheelhouse), str(source)],
         "building the agent's wheel")
    wheels = sorted(wheelhouse.glob(AGENT_WHEEL_GLOB))
    if len(wheels) != 1:
        raise BuildError(f"expected one agent wheel in {wheelhouse}, found {wheels}")
    # The dependencies of *this* wheel (never a same-named project from the index).
    index = ["--no-index"] if offline else []
    _run([*pip, "wheel", *index, "--find-links", str(wheelhouse), "-w", str(wheelhouse),
          str(wheels[0])], "fetching the agent's dependencies")


def _run(command: list[str], what: str, env: dict[str, str] | None = None) -> None:
    log.info("%s: %s", what, " ".join(command))
    try:
        subprocess.run(command, check=True, env=env, cwd=REPO)
    except FileNotFoundError as exc:
        raise BuildError(f"{what}: {exc.filename} not found (run `make deps venv`)") from exc
    except subprocess.CalledProcessError as exc:
        raise BuildError(f"{what} failed with exit status {exc.returncode}") from exc


def run_disk_image_create(recipe: Recipe, env: dict[str, str], prefix: Path,
                          logfile: Path) -> None:
    tool = shutil.which("disk-image-create", path=env["PATH"])
    if tool is None:
        raise BuildError("disk-image-create not found: install the 'build' extra "
                         "(`make venv`)")
    # -n: no implicit 'base' element (it adds software-properties-common, packagekit and
    # polkit, none of which a diskless node wants).
    command = [tool, "-n", "-a", "amd64", "-o", str(prefix), "--logfile", str(logfile)]
    if recipe.output == "rootfs":
        # The raw image as the block-device config made it (no qcow2 conversion).
        command += ["-t", "raw"]
    if recipe.packages:
        command += ["-p", ",".join(recipe.packages)]
    command += list(recipe.elements)
    try:
        run_dib(command, recipe.name, env, logfile)
    except BuildFailed as exc:
        raise BuildError(str(exc)) from exc


def _read_table(path: Path) -> dict[str, str]:
    """A file of ``key<TAB>value`` lines written by the elements."""
    if not path.is_file():
        return {}
    rows = (line.split("\t", 1) for line in path.read_text().splitlines() if "\t" in line)
    return {key: value for key, value in rows}


def _file_entry(path: Path) -> dict[str, object]:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def make_manifest(recipe: Recipe, staged: Path, prefix: Path, seconds: float,
                  wheelhouse: Path) -> dict[str, object]:
    """The manifest the config server reads (configserver/images.py)."""
    hypervisor = HYPERVISOR if (staged / HYPERVISOR).is_file() else None
    hypervisor_efi = HYPERVISOR_EFI if (staged / HYPERVISOR_EFI).is_file() else None
    rootfs = ROOTFS if (staged / ROOTFS).is_file() else None
    files = {name: _file_entry(staged / name)
             for name in (KERNEL, INITRAMFS, HYPERVISOR, HYPERVISOR_EFI, ROOTFS)
             if (staged / name).is_file()}
    versions = _read_table(prefix.with_name(prefix.name + ".versions"))
    versions.update(_read_table(prefix.with_name(prefix.name + ".xen-version")))
    wheels = sorted(wheelhouse.glob(AGENT_WHEEL_GLOB))
    if wheels and "netboot-agent" in recipe.elements:
        versions["nodeagent"] = wheels[-1].name.split("-")[1]
    with contextlib.suppress(metadata.PackageNotFoundError):
        versions["diskimage-builder"] = metadata.version("diskimage-builder")
    manifest: dict[str, object] = {
        "name": recipe.name,
        "description": recipe.description,
        "kernel": KERNEL,
        "initramfs": INITRAMFS,
        "hypervisor": hypervisor,
        "hypervisor_efi": hypervisor_efi,
        "files": files,
        "built": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "build_seconds": round(seconds, 1),
        "elements": list(recipe.elements),
        "packages": _read_table(prefix.with_name(prefix.name + ".packages")),
        "versions": versions,
    }
    args = prefix.with_name(prefix.name + ".xen-args")
    if hypervisor and args.is_file():
        manifest["hypervisor_args"] = args.read_text().strip()
    if rootfs:
        manifest["rootfs"] = rootfs
    # The kernel command line the image wants (the guest: root=/dev/xvda console=hvc0).
    kernel_args = prefix.with_name(prefix.name + ".kernel-args")
    if kernel_args.is_file():
        manifest["kernel_args"] = kernel_args.read_text().strip()
    return manifest


def build_outputs(recipe: Recipe) -> tuple[dict[str, str], set[str]]:
    """The build's outputs (published name -> suffix of disk-image-create's -o name), and
    which of them the build must leave."""
    if recipe.output == "rootfs":
        outputs = {KERNEL: ".vmlinuz", INITRAMFS: ".initramfs.img", ROOTFS: ".raw"}
        return outputs, set(outputs)
    outputs = {KERNEL: ".vmlinuz", INITRAMFS: ".initramfs.img", HYPERVISOR: ".xen",
               HYPERVISOR_EFI: ".xen.efi"}
    required = {KERNEL, INITRAMFS}
    if "xen-dom0" in recipe.elements:
        required |= {HYPERVISOR, HYPERVISOR_EFI}
    return outputs, required


def publish(recipe: Recipe, prefix: Path, output: Path, seconds: float,
            wheelhouse: Path) -> Path:
    """Move the build's outputs into ``output/<role>/``, replacing the old image at once."""
    staged = output / f".{recipe.name}.new"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    outputs, required = build_outputs(recipe)
    for name, suffix in outputs.items():
        source = prefix.with_name(prefix.name + suffix)
        if source.is_file():
            shutil.move(source, staged / name)
    missing = sorted(required - set(os.listdir(staged)))
    if set(missing) & {HYPERVISOR, HYPERVISOR_EFI}:
        raise BuildError(f"the xen-dom0 element left no hypervisor {' '.join(missing)}")
    if missing:
        maker = "netboot-guest" if recipe.output == "rootfs" else "netboot-live"
        raise BuildError(f"the build left no {' '.join(missing)} next to {prefix}: "
                         f"is '{maker}' in the recipe?")
    manifest = make_manifest(recipe, staged, prefix, seconds, wheelhouse)
    (staged / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    final = output / recipe.name
    retired = output / f".{recipe.name}.old"
    shutil.rmtree(retired, ignore_errors=True)
    if final.exists():
        final.rename(retired)
    staged.rename(final)
    shutil.rmtree(retired, ignore_errors=True)
    return final


def build(recipe: Recipe, paths: BuildPaths, offline: bool = False) -> Path:
    """Build and publish one image; returns its directory."""
    if not paths.agent_unit.is_file() and "netboot-agent" in recipe.elements:
        raise BuildError(f"no agent unit at {paths.agent_unit} "
                         "(set DIB_NETBOOT_AGENT_UNIT to another file)")
    started = time.monotonic()
    if "netboot-agent" in recipe.elements:
        build_wheelhouse(paths.wheelhouse, offline)
    work = paths.output / f".{recipe.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    prefix = work / recipe.name
    env = build_environment(recipe, paths, dict(os.environ))
    logfile = paths.output / f"{recipe.name}.log"
    logfile.unlink(missing_ok=True)
    run_disk_image_create(recipe, env, prefix, logfile)
    final = publish(recipe, prefix, paths.output, time.monotonic() - started, paths.wheelhouse)
    shutil.rmtree(work, ignore_errors=True)
    log.info("image %s published in %s after %.0f s", recipe.name, final,
             time.monotonic() - started)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path, help="images/<role>.toml")
    parser.add_argument("--output", type=Path, default=REPO / "build" / "images",
                        help="where build/images/<role>/ is published (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=REPO / "build" / "cache",
                        help="diskimage-builder and wheel caches (default: %(default)s)")
    parser.add_argument("--agent-unit", type=Path,
                        default=Path(os.environ.get("DIB_NETBOOT_AGENT_UNIT")
                                     or REPO / "systemd" / "nodeagent.service"),
                        help="the agent's systemd unit (default: %(default)s)")
    parser.add_argument("--offline", action="store_true",
                        help="take the agent's dependencies from the wheel cache only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="build.py: %(message)s")
    try:
        recipe = load_recipe(args.recipe)
        paths = BuildPaths(output=args.output.resolve(), cache=args.cache.resolve(),
                           wheelhouse=args.cache.resolve() / "wheels",
                           agent_unit=args.agent_unit.resolve())
        build(recipe, paths, offline=args.offline)
    except BuildError as exc:
        print(f"build.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("build.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
