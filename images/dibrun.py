"""Running diskimage-builder for ``images/build.py``: one line of progress on a terminal,
quiet elsewhere, and the end of its log when it fails. Stdlib only."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

log = logging.getLogger("images.build")
REPO = Path(__file__).resolve().parent.parent


class BuildFailed(Exception):
    """disk-image-create failed or could not start (build.py turns it into its BuildError)."""


def run_dib(command: list[str], name: str, env: dict[str, str], logfile: Path) -> None:
    """Run disk-image-create: a line of progress on a terminal, quiet elsewhere.

    With ``--logfile``, diskimage-builder writes its output there only; the progress follows
    that file as it grows. What it prints before it has a log (a bad element name) goes to
    ``<role>.console.log``."""
    log.info("building image %s: %s", name, " ".join(command))
    terminal = sys.stderr.isatty()
    progress, started = DibProgress(), time.monotonic()
    console = logfile.with_suffix(".console.log")
    with console.open("w") as sink:
        try:
            process = subprocess.Popen(command, env=env, cwd=REPO, stdout=sink,
                                       stderr=subprocess.STDOUT)
        except FileNotFoundError as exc:
            raise BuildFailed(f"building image {name}: {exc.filename} not found") from exc
        with _Follow(logfile) as follow:
            while True:
                finished = process.poll() is not None  # then read what is left, once more
                for line in follow.lines():
                    if progress.feed(line) and terminal:
                        status = progress.status(name, time.monotonic() - started)
                        sys.stderr.write(f"\r\x1b[K{status}")
                        sys.stderr.flush()
                if finished:
                    break
                time.sleep(0.5)
    if terminal:
        sys.stderr.write("\n")
    if process.returncode != 0:
        tail = []
        for path in (console, logfile):
            if path.exists():
                tail += path.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        print("\n".join(tail[-LOG_TAIL:]), file=sys.stderr)
        raise BuildFailed(f"building image {name} failed with exit status "
                         f"{process.returncode} in {progress.phase or 'its setup'} "
                         f"{progress.hook} (the whole log: {logfile})")


class _Follow:
    """The complete lines added to a file since the last call (the file may appear late)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: TextIO | None = None
        self.partial = ""

    def __enter__(self) -> _Follow:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()

    def lines(self) -> list[str]:
        if self.file is None:
            try:
                self.file = self.path.open(errors="replace")
            except FileNotFoundError:
                return []
        text = self.partial + self.file.read()
        *complete, self.partial = text.split("\n")
        return complete


# The phases whose hooks dib-run-parts runs, in order.
DIB_PHASES = ("root.d", "extra-data.d", "pre-install.d", "install.d", "post-install.d",
              "block-device.d", "pre-finalise.d", "finalise.d", "cleanup.d")
_COPIED = re.compile(r"Copying hooks \S*/(?P<phase>[a-z-]+\.d)/(?P<hook>[^/\s]+)\s*$")
_RUNNING = re.compile(r"dib-run-parts Running \S*/(?P<phase>[a-z-]+\.d)/(?P<hook>[^/\s]+)\s*$")
LOG_TAIL = 60  # lines of the log shown when a build fails


@dataclass
class DibProgress:
    """Where a diskimage-builder run is, from the lines it prints (pure): how many hooks its
    elements brought, how many have started, and the phase and hook running now."""

    hooks: int = 0
    started: int = 0
    phase: str = ""
    hook: str = ""

    def feed(self, line: str) -> bool:
        """Take one line of output; True when the hook running changed."""
        copied = _COPIED.search(line)
        if copied and copied["phase"] in DIB_PHASES:
            self.hooks += 1
            return False
        running = _RUNNING.search(line)
        if not running or running["phase"] not in DIB_PHASES:
            return False
        self.started += 1
        self.phase, self.hook = running["phase"], running["hook"]
        return True

    def status(self, name: str, seconds: float) -> str:
        total = max(self.hooks, self.started)
        return (f"image {name}: hook {self.started}/{total}, {self.phase} {self.hook} "
                f"({int(seconds) // 60}m{int(seconds) % 60:02d}s)")
