"""Test tiers: unit (default), integration (loopback processes), netns (root), vm (QEMU).

Unit tests may not start processes: an autouse fixture replaces the process-spawning calls
with ones that fail the test.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

PROCESS_MARKERS = {"integration", "netns", "vm"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        needs_root = item.get_closest_marker("netns") or item.get_closest_marker("vm")
        if needs_root and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root (network namespaces)"))


@pytest.fixture(autouse=True)
def _no_subprocess_in_unit_tests(request, monkeypatch):
    if any(request.node.get_closest_marker(m) for m in PROCESS_MARKERS):
        yield
        return

    def banned(*args, **kwargs):
        raise AssertionError("unit tests may not start processes; mark the test "
                             "integration, netns or vm")

    monkeypatch.setattr(subprocess.Popen, "__init__", banned)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", banned)
    monkeypatch.setattr(asyncio, "create_subprocess_shell", banned)
    monkeypatch.setattr(os, "system", banned)
    yield
