"""Throwaway network namespaces for the netns and vm tiers.

Everything created here lives inside namespaces the test makes and removes: veth pairs, bridges
and taps are created inside them, never on the host, and addresses come from 198.18.0.0/15.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, *, step: float = 0.2,
             process: subprocess.Popen | None = None, log: Path | None = None) -> T:
    """Poll ``predicate`` until it returns something true, and return that.

    Fails after ``timeout`` seconds, or at once if ``process`` has exited, with the end of
    ``log``.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        exited = process is not None and process.poll() is not None
        if exited or time.monotonic() > deadline:
            reason = (f"process exited ({process.returncode})" if exited and process
                      else f"timed out after {timeout:.0f}s")
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise AssertionError(f"{reason} waiting for {what}" + (f":\n{tail}" if tail else ""))
        time.sleep(step)


def stop(process: subprocess.Popen, timeout: float = 10) -> int:
    """Terminate ``process``, killing it if it outlives ``timeout``; return its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 60,
        **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, timeout=timeout, capture_output=True,
                          text=True, **kwargs)


class Netns:
    """A named network namespace with its own /etc/netns resolv.conf, removed on close."""

    def __init__(self, prefix: str = "nbt") -> None:
        self.name = f"{prefix}-{secrets.token_hex(3)}"
        run(["ip", "netns", "add", self.name])
        self.etc = Path("/etc/netns") / self.name
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / "resolv.conf").write_text("# test namespace: no resolver\n")
        self.ip("link", "set", "lo", "up")

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        return run(self.cmd(*argv), check=check, timeout=timeout, **kwargs)

    def popen(self, *argv: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*argv), **kwargs)

    def ip(self, *argv: str) -> subprocess.CompletedProcess:
        return run(["ip", "-n", self.name, *argv])

    def close(self) -> None:
        # Kill whatever still runs inside, then drop the namespace and its /etc overlay.
        pids = run(["ip", "netns", "pids", self.name], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        run(["ip", "netns", "del", self.name], check=False)
        shutil.rmtree(self.etc, ignore_errors=True)


def veth_pair(a: Netns, b: Netns, addr_a: str, addr_b: str, *,
              name_a: str = "eth0", name_b: str = "eth0") -> None:
    """Join two namespaces by a veth pair created inside ``a`` and moved into ``b``."""
    tmp = f"vb{secrets.token_hex(3)}"
    a.ip("link", "add", name_a, "type", "veth", "peer", "name", tmp)
    a.ip("link", "set", tmp, "netns", b.name)
    b.ip("link", "set", tmp, "name", name_b)
    for ns, name, addr in ((a, name_a, addr_a), (b, name_b, addr_b)):
        if addr:
            ns.ip("addr", "add", addr, "dev", name)
        ns.ip("link", "set", name, "up")


@contextlib.contextmanager
def namespaces(count: int, prefix: str = "nbt") -> Iterator[list[Netns]]:
    made: list[Netns] = []
    try:
        for _ in range(count):
            made.append(Netns(prefix))
        yield made
    finally:
        for ns in made:
            ns.close()
