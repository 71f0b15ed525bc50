"""Throwaway network namespaces for the netns and vm tiers.

Everything created here lives inside namespaces the test makes and removes: veth pairs, bridges
and taps are created inside them, never on the host, and addresses come from 198.18.0.0/15.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from configserver.farm import network

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


class Netns(network.Namespace):
    """A throwaway namespace (random name), made at once and removed by ``close``."""

    def __init__(self, prefix: str = "nbt") -> None:
        super().__init__(f"{prefix}-{secrets.token_hex(3)}")
        self.create()

    def run(self, *argv: str, check: bool = True, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        return run(self.cmd(*argv), check=check, timeout=timeout, **kwargs)

    def popen(self, *argv: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*argv), **kwargs)

    def close(self) -> None:
        self.destroy(grace=0)


veth_pair = network.veth_pair


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
