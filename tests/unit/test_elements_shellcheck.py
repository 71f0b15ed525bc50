"""Shellcheck over every element script and images/*.sh (integration tier: runs shellcheck)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ELEMENTS = Path(__file__).resolve().parents[2] / "elements"
PHASES = ("root.d", "extra-data.d", "pre-install.d", "install.d", "post-install.d",
          "post-root.d", "block-device.d", "pre-finalise.d", "finalise.d", "cleanup.d")


def shell_files() -> list[Path]:
    groups = {
        "phase scripts": [p for phase in PHASES for p in sorted(ELEMENTS.glob(f"*/{phase}/*"))],
        "environment.d files": sorted(ELEMENTS.glob("*/environment.d/*.bash")),
        "static executables": sorted(p for p in ELEMENTS.glob("*/static/**/*")
                                     if p.is_file() and p.parent.name in {"sbin", "bin"}
                                     and not p.read_text().startswith("#!/usr/bin/python3")),
        "images/*.sh": sorted(ELEMENTS.parent.glob("images/*.sh")),
    }
    # Each glob must match: one that stopped matching would drop its files from the check.
    empty = [name for name, files in groups.items() if not files]
    assert not empty, f"no {', '.join(empty)} found"
    return [p for files in groups.values() for p in files]


@pytest.mark.integration
def test_shellcheck_passes_on_element_scripts():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (make deps)")
    files = shell_files()
    assert len(files) >= 10, f"expected the element scripts, found {files}"
    result = subprocess.run(["shellcheck", "--shell=bash", "--severity=style",
                             *map(str, files)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
