"""``python -m configserver.tftp`` inside a namespace, for the netns TFTP tests."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import netlab

REPO = Path(__file__).resolve().parents[2]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class TftpServerProcess:
    """The standalone server on ``address:69`` of eth0; its events are its stdout lines,
    its log (level INFO) is ``log_path``."""

    def __init__(self, ns, root: Path, workdir: Path, *settings: str, address: str,
                 leases: tuple[str, ...] = ()) -> None:
        self.events_path = workdir / f"events-{time.monotonic_ns()}.jsonl"
        self.log_path = self.events_path.with_suffix(".log")
        argv = [sys.executable, "-m", "configserver.tftp", "--root", str(root),
                "--address", address, "--port", "69", "--interface", "eth0",
                "--log-level", "INFO"]
        for lease in leases:
            argv += ["--lease", lease]
        for setting in settings:
            argv += ["--set", setting]
        with self.events_path.open("w") as out, self.log_path.open("w") as err:
            self.proc = ns.popen(*argv, stdout=out, stderr=err, cwd=REPO)
        deadline = time.monotonic() + 20
        while "READY" not in self.events_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("TFTP server did not start: " + self.log_path.read_text())
            time.sleep(0.05)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.events_path.read_text().splitlines()
                if line.startswith("{")]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def peak_memory_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def stop(self) -> None:
        netlab.stop(self.proc)
