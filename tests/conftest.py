"""Test tiers: unit (default), integration (loopback processes), netns (root), vm (QEMU),
browser (root: Chromium in a namespace).

Unit tests may not start processes: an autouse fixture replaces the process-spawning calls
with ones that fail the test.

Property tests (hypothesis) run under a profile: ``dev`` by default, ``ci`` (the same number of
examples, derandomized, so a CI failure replays) when CI=true, and ``fuzz`` (many more examples)
on demand: ``HYPOTHESIS_PROFILE=fuzz make test-unit``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest
from hypothesis import HealthCheck, settings

# The autouse fixture below is function-scoped; it only bans process creation, which holds
# for every example alike.
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True,
                          database=None, print_blob=True)
settings.register_profile("fuzz", parent=settings.get_profile("dev"), max_examples=20_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE")
                      or ("ci" if os.environ.get("CI") == "true" else "dev"))

PROCESS_MARKERS = {"integration", "netns", "vm", "browser"}


class SkipReport:
    """Skipped tests, named at the end of the run; under CI (CI=true) they fail it.

    CI runs as root after ``make deps`` and ``make images``, so a test that skips there is a
    test that never runs: a missing install step, not a pass.
    """

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.skipped: dict[str, str] = {}

    def pytest_runtest_logreport(self, report) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
            self.skipped.setdefault(report.nodeid, str(reason))

    def pytest_sessionfinish(self, session) -> None:
        if self.strict and self.skipped and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.skipped:
            return
        count = len(self.skipped)
        if self.strict:
            terminalreporter.write_line(
                f"FAILED: {count} test(s) skipped under CI, where every test must run:",
                red=True, bold=True)
        else:
            terminalreporter.write_line(
                f"{count} test(s) skipped (under CI, CI=true, a skip fails the run):",
                yellow=True, bold=True)
        for nodeid, reason in self.skipped.items():
            terminalreporter.write_line(f"  {nodeid}: {reason}")


def pytest_configure(config):
    config.pluginmanager.register(SkipReport(os.environ.get("CI") == "true"), "skip-report")


def pytest_collection_modifyitems(config, items):
    for item in items:
        needs_root = any(item.get_closest_marker(m) for m in ("netns", "vm", "browser"))
        if needs_root and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root (network namespaces)"))


@pytest.fixture(autouse=True)
def _no_subprocess_in_unit_tests(request, monkeypatch):
    if any(request.node.get_closest_marker(m) for m in PROCESS_MARKERS):
        yield
        return

    attempts: list[str] = []

    def banned(*args, **kwargs):
        # Recorded as well as raised: code under test may catch the exception broadly.
        attempts.append(repr(args[:2])[:200])
        raise ProcessBanned("unit tests may not start processes; mark the test "
                            "integration, netns, vm or browser")

    monkeypatch.setattr(subprocess.Popen, "__init__", banned)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", banned)
    monkeypatch.setattr(asyncio, "create_subprocess_shell", banned)
    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "subprocess_exec", banned)
    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "subprocess_shell", banned)
    for name in ("system", "posix_spawn", "posix_spawnp", "fork", "execv", "execve",
                 "execvp", "execvpe"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, banned)
    yield
    assert not attempts, f"a unit test tried to start processes: {attempts}"


class ProcessBanned(BaseException):
    """Raised when a unit test starts a process (a BaseException so no handler hides it)."""


@pytest.fixture
def pki(tmp_path):
    """A CA of its own for the test (tests/pkitest.py)."""
    from pkitest import Pki

    return Pki(tmp_path)


@pytest.fixture
async def serve_split(aiohttp_client, pki):
    """``await serve_split(app[, identity])``: a SplitClient (tests/pkitest.py) of ``app``."""
    from pkitest import ADMIN, split_client

    sessions: list = []

    async def start(app, identity=ADMIN):
        return await split_client(aiohttp_client, app, pki, identity, cleanup=sessions)

    yield start
    for session in sessions:
        await session.close()
