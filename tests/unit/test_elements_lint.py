"""The diskimage-builder element conventions (docs/images.md), checked without running anything.

Modelled on diskimage-builder's ``dib-lint``: every element has a README with a table of its
DIB_* variables, ``element-deps`` and ``package-installs.yaml``; phase directories hold only
executables named ``NN-name`` (unique per phase across all elements, since diskimage-builder
merges them); every script starts with ``set -eu -o pipefail`` and traces only under
``DIB_DEBUG_TRACE``. Shellcheck runs in test_elements_shellcheck.py (integration tier).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest

ELEMENTS = Path(__file__).resolve().parents[2] / "elements"
EXPECTED = {"netboot-live", "netboot-base", "netboot-agent", "netboot-prune", "netboot-kernel",
            "netboot-guest", "xen-dom0", "storage-node"}
# diskimage-builder's phases that hold executables (environment.d is sourced, not executed).
PHASES = {"root.d", "extra-data.d", "pre-install.d", "install.d", "post-install.d",
          "post-root.d", "block-device.d", "pre-finalise.d", "finalise.d", "cleanup.d"}
TOP_LEVEL_FILES = {"README.rst", "element-deps", "package-installs.yaml", "element-provides",
                   "pkg-map", "block-device-default.yaml"}
TOP_LEVEL_DIRS = PHASES | {"environment.d", "static"}
SCRIPT_NAME = re.compile(r"^(\d\d)-[a-z0-9][a-z0-9-]*$")
ENVIRONMENT_NAME = re.compile(r"^\d\d-[a-z0-9][a-z0-9-]*\.bash$")
STRICT = "set -eu -o pipefail"
TRACE_GUARD = re.compile(r'^if \[ "\$\{DIB_DEBUG_TRACE:-0\}" -gt 0 \]; then$')
DIB_VARIABLE = re.compile(r"\b(DIB_[A-Z0-9_]+)=")


def element_dirs() -> list[Path]:
    found = sorted(p for p in ELEMENTS.iterdir() if p.is_dir())
    assert found, f"no elements under {ELEMENTS}"
    return found


# Every element in the tree, not a list kept by hand: a new element is checked at once.
ALL_ELEMENTS = [p.name for p in element_dirs()]


def phase_scripts() -> list[Path]:
    scripts = [s for e in element_dirs() for phase in PHASES if (e / phase).is_dir()
               for s in sorted((e / phase).iterdir())]
    assert scripts, "no phase scripts found"
    return scripts


def static_executables() -> list[Path]:
    """Executables an element installs (static/.../sbin and bin)."""
    executables = sorted(p for e in element_dirs() for p in (e / "static").rglob("*")
                         if p.is_file() and p.parent.name in {"sbin", "bin"})
    assert executables, "no executables under the elements' static/ (sbin, bin)"
    return executables


def is_python(path: Path) -> bool:
    return path.read_text().startswith("#!/usr/bin/python3")


def static_scripts() -> list[Path]:
    """The shell ones: held to the same rules as phase scripts."""
    return [p for p in static_executables() if not is_python(p)]


def test_static_executables_are_bash_or_the_images_python():
    executables = static_executables()
    assert executables, "no static executables found"
    for path in executables:
        first = path.read_text().splitlines()[0]
        assert first in ("#!/bin/bash", "#!/usr/bin/python3"), f"{path}: {first}"
        assert path.stat().st_mode & 0o111, f"{path}: not executable"


def test_every_expected_element_exists():
    assert {p.name for p in element_dirs()} >= EXPECTED


@pytest.mark.parametrize("element", ALL_ELEMENTS)
def test_element_has_required_files(element):
    directory = ELEMENTS / element
    for name in ("README.rst", "element-deps", "package-installs.yaml"):
        assert (directory / name).is_file(), f"{element}: missing {name}"
    deps = (directory / "element-deps").read_text().split()
    assert deps, f"{element}: element-deps is empty"


@pytest.mark.parametrize("element", ALL_ELEMENTS)
def test_element_holds_only_known_entries(element):
    for entry in (ELEMENTS / element).iterdir():
        allowed = TOP_LEVEL_DIRS if entry.is_dir() else TOP_LEVEL_FILES
        assert entry.name in allowed, f"{element}: unexpected {entry.name}"


@pytest.mark.parametrize("element", ALL_ELEMENTS)
def test_readme_has_a_table_of_every_variable(element):
    directory = ELEMENTS / element
    readme = (directory / "README.rst").read_text()
    assert re.search(r"^=+ +=+", readme, re.M), f"{element}: README.rst has no variable table"
    defined = set()
    environment = sorted((directory / "environment.d").glob("*"))
    for path in environment:
        defined |= set(DIB_VARIABLE.findall(path.read_text()))
    # An environment.d that defines no DIB_* variable means DIB_VARIABLE no longer finds them.
    assert defined or not environment, f"{element}: no DIB_* variable found in {environment}"
    for variable in sorted(defined):
        assert re.search(rf"^``{variable}``\s", readme, re.M), \
            f"{element}: {variable} is not in the README.rst table"


def test_phase_scripts_are_named_executables():
    for script in phase_scripts():
        assert script.is_file(), f"{script}: phase directories hold only files"
        assert SCRIPT_NAME.match(script.name), f"{script}: name must be NN-name"
        assert script.stat().st_mode & 0o111, f"{script}: not executable"


def test_phase_script_names_are_unique_per_phase():
    seen: dict[tuple[str, str], list[Path]] = defaultdict(list)
    prefixes: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for script in phase_scripts():
        seen[(script.parent.name, script.name)].append(script)
        prefixes[(script.parent.name, script.name[:2])].append(script)
    duplicates = [paths for paths in seen.values() if len(paths) > 1]
    assert not duplicates, f"scripts that diskimage-builder would merge: {duplicates}"
    for (phase, prefix), paths in prefixes.items():
        elements = {p.parent.parent.name for p in paths}
        assert len(paths) == len(elements), \
            f"{phase}: two-digit prefix {prefix} used twice in one element: {paths}"


@pytest.mark.parametrize("script", phase_scripts() + static_scripts(),
                         ids=lambda p: str(p.relative_to(ELEMENTS)))
def test_script_is_strict_and_traces_only_when_asked(script):
    lines = script.read_text().splitlines()
    assert lines and lines[0] == "#!/bin/bash", f"{script}: must start with #!/bin/bash"
    code = [line.strip() for line in lines[1:] if line.strip() and
            not line.strip().startswith("#")]
    # Allowed before the strict line: the DIB_DEBUG_TRACE guard itself.
    guard = ['if [ "${DIB_DEBUG_TRACE:-0}" -gt 0 ]; then', "set -x", "fi"]
    if code[:3] == guard:
        code = code[3:]
    assert code and code[0] == STRICT, f"{script}: first command must be '{STRICT}'"
    for number, line in enumerate(lines):
        if re.match(r"^\s*set -[a-z]*x", line):
            assert number > 0 and TRACE_GUARD.match(lines[number - 1].strip()), \
                f"{script}:{number + 1}: set -x outside the DIB_DEBUG_TRACE guard"


def test_environment_files_are_sourced_fragments():
    files = [p for e in element_dirs() if (e / "environment.d").is_dir()
             for p in (e / "environment.d").iterdir()]
    assert files, "no environment.d files found"
    for path in files:
        assert ENVIRONMENT_NAME.match(path.name), f"{path}: name must be NN-name.bash"
        text = path.read_text()
        assert not re.search(r"^\s*set -", text, re.M), \
            f"{path}: sourced into diskimage-builder, must not change shell options"


def test_static_holds_data_not_build_scripts():
    checked = 0
    for element in element_dirs():
        static = element / "static"
        if not static.is_dir():
            continue
        for path in static.rglob("*"):
            assert path.name not in TOP_LEVEL_FILES, f"{path}: element file inside static/"
            assert path.parent.name not in PHASES, f"{path}: phase script inside static/"
            checked += 1
    assert checked, "no element has a static/ directory"


def test_package_installs_are_valid():
    yaml = pytest.importorskip("yaml")
    for element in element_dirs():
        data = yaml.safe_load((element / "package-installs.yaml").read_text())
        assert isinstance(data, dict) and data, f"{element.name}: no packages"
        for package, options in data.items():
            assert re.match(r"^[a-z0-9][a-z0-9+.-]+$", package), f"{element.name}: {package}"
            assert options is None or isinstance(options, dict), f"{element.name}: {package}"


def test_element_deps_resolve():
    dib = pytest.importorskip("diskimage_builder")
    dib_elements = Path(dib.__file__).parent / "elements"
    known = {p.name for p in element_dirs()} | {p.name for p in dib_elements.iterdir()}
    for element in element_dirs():
        for dep in (element / "element-deps").read_text().split():
            assert dep in known, f"{element.name}: unknown element {dep}"


def test_module_allow_lists_are_well_formed():
    lists = sorted(ELEMENTS.glob("*/static/etc/netboot-prune/modules.allow.d/*.list"))
    assert lists, "no kernel module allow-lists"
    for path in lists:
        for number, raw in enumerate(path.read_text().splitlines(), 1):
            rule = raw.split("#", 1)[0].strip()
            if rule:
                assert re.match(r"^-?[a-z0-9_][a-z0-9_./*-]*$", rule), f"{path}:{number}: {raw}"
                assert not rule.lstrip("-").startswith("kernel/"), \
                    f"{path}:{number}: rules are relative to kernel/"


def test_every_element_is_checked():
    # The parametrized checks above run over the tree's elements; the ones the images use
    # must be among them (a renamed or lost directory fails here, not silently).
    assert set(ALL_ELEMENTS) >= EXPECTED, EXPECTED - set(ALL_ELEMENTS)


def test_block_device_configs_are_valid():
    yaml = pytest.importorskip("yaml")
    configs = sorted(ELEMENTS.glob("*/block-device-default.yaml"))
    assert configs, "no element ships a block-device config"
    for path in configs:
        config = yaml.safe_load(path.read_text())
        assert isinstance(config, list) and config, f"{path}: not a list of nodes"
        kinds = [next(iter(node)) for node in config]
        assert kinds[0] == "local_loop", f"{path}: must start with a local_loop"
        mkfs = [node["mkfs"] for node in config if "mkfs" in node]
        assert any(m.get("mount", {}).get("mount_point") == "/" for m in mkfs), \
            f"{path}: no file system is mounted on /"

