"""ruff over the whole Python tree (the same check as `make lint`)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]


def python_scripts() -> list[str]:
    scripts = [str(p) for p in sorted(ROOT.glob("bench/*/run"))
               if p.read_text().startswith("#!/usr/bin/env python")]
    assert scripts, "no Python bench scripts found"
    installed = [str(p) for p in sorted(ROOT.glob("elements/*/static/**/*"))
                 if p.is_file() and p.read_text(errors="replace").startswith("#!/usr/bin/python3")]
    assert installed, "no Python scripts in the elements found"
    return scripts + installed


def test_ruff_is_clean():
    ruff = Path(sys.executable).with_name("ruff")
    done = subprocess.run([str(ruff), "check", "configserver", "nodeagent", "netbootmac",
                           "tests", "bench", "images", *python_scripts()], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
