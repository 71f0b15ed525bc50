"""The vm tier's shared cloud farm (2 dom0s, 2 storage nodes: ``farm up --cloud``) and the
calls its tests make through the real CLI and ssh (``test_volumes.py``)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_farm import IMAGES, READY_BUDGET, _require_images

from configserver.farm import BootFailed, network
from configserver.farm.farm import Farm, FarmConfig, FarmState, plan_nodes

WRITER = (Path(__file__).with_name("volume_writer.py")).read_text()
SETTLE = 300  # seconds for a volume to reach a state under TCG, four VMs on two cores
GUEST_BOOT = 420  # seconds for a PV guest to boot and answer, inside a TCG dom0
TARGETS = "/sys/kernel/config/target/iscsi"


def until(subject: str, what: str, fetch: Callable[[], dict[str, Any]],
          ready: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
    """``fetch()`` every 2 s until ``ready`` says yes; the test fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        view = fetch()
        if ready(view):
            return view
        if time.monotonic() > deadline:
            pytest.fail(f"{subject} not {what} within {timeout:.0f}s:\n"
                        + json.dumps(view, indent=1))
        time.sleep(2)


class Cloud:
    """The shared farm, with the calls the tests make."""

    def __init__(self, farm: Farm) -> None:
        self.farm = farm
        state = FarmState.load(farm.dir)
        assert state is not None
        self.nodes = {n["name"]: n for n in state.nodes}

    def cli(self, *argv: str) -> Any:
        return self.farm.cli_json(*argv)

    def show(self, name: str) -> dict[str, Any]:
        return self.cli("volume", "show", name)

    def wait(self, name: str, what: str, ready: Callable[[dict[str, Any]], bool],
             timeout: float = SETTLE) -> dict[str, Any]:
        return until(f"volume {name}", what, lambda: self.show(name), ready, timeout)

    def attached_on(self, name: str, node: str) -> dict[str, Any]:
        mac = self.nodes[node]["mac"]
        return self.wait(name, f"attached on {node}", lambda v: any(
            a["node"] == mac and a["state"] == "attached" for a in v["attached"]))

    def ssh(self, node: str, command: str, *, timeout: float = 180,
            input_text: str | None = None, check: bool = True) -> str:
        done = network.run(self.farm.ssh_command(node, [command]), timeout=timeout,
                           check=False, input_text=input_text)
        if check and done.returncode != 0:
            pytest.fail(f"{node}: {command!r} failed ({done.returncode}): "
                        f"{done.stdout}{done.stderr}")
        return done.stdout

    def verify(self, node: str, device: str, result: dict[str, Any], seed: int,
               blocks: int) -> dict[str, Any]:
        out = self.ssh(node, f"python3 - verify {device} --blocks {blocks} --seed {seed} "
                             f"--passes {result['passes']} --last {result['last']}",
                       input_text=WRITER)
        return json.loads(out.splitlines()[-1])

    def writer(self, node: str, device: str, seconds: float, seed: int, blocks: int = 64,
               *extra: str) -> Writer:
        argv = self.farm.ssh_command(node, [f"python3 - write {device} {seconds:g} "
                                            f"--blocks {blocks} --seed {seed} {' '.join(extra)}"])
        return Writer(argv, WRITER)

    def legs_on(self, node: str) -> set[str]:
        """The logical volumes of ours on a storage node."""
        out = self.ssh(node, "lvs --noheadings -o lv_name netboot 2>/dev/null || true")
        return {line.strip() for line in out.splitlines() if line.strip().startswith("nb-")}

    def acls(self, node: str) -> dict[str, set[str]]:
        """Which initiators each of our targets on a storage node lets in (from configfs)."""
        out = self.ssh(node, f"for t in $(ls {TARGETS} 2>/dev/null | grep '^iqn\\.'); do "
                             f"echo T $t; for a in $(ls {TARGETS}/$t/tpgt_1/acls 2>/dev/null); "
                             "do echo A $t $a; done; done")
        found: dict[str, set[str]] = {}
        for line in out.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "T":
                found.setdefault(rest, set())
            elif kind == "A":
                target, _, acl = rest.partition(" ")
                found.setdefault(target, set()).add(acl)
        return found


class Writer:
    """``volume_writer.py write`` on a dom0 over ssh; its event lines timed on this host."""

    def __init__(self, argv: list[str], script: str) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdin is not None
        self.proc.stdin.write(script)
        self.proc.stdin.close()
        self.events: dict[str, float] = {}
        self.lines: list[str] = []
        self.result: dict[str, Any] | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if "event" in data:
                self.events.setdefault(data["event"], time.monotonic())
            else:
                self.result = data

    def wait_event(self, event: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while event not in self.events:
            if time.monotonic() > deadline or (self.proc.poll() is not None
                                               and not self._reader.is_alive()):
                pytest.fail(f"writer: no {event!r} within {timeout:.0f}s: {self.lines}")
            time.sleep(0.05)
        return self.events[event]

    def finish(self, timeout: float) -> dict[str, Any]:
        self.proc.wait(timeout)
        self._reader.join(10)
        if self.result is None:
            pytest.fail(f"writer printed no result: {''.join(self.lines)}")
        return self.result


def boot_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """The module's farm: booted here, or (for working on these tests) the cloud farm already
    up in ``$NETBOOT_VM_CLOUD_FARM`` (``farm up --cloud --fresh``), which is left up."""
    _require_images("dom0", "storage", "guest")
    reuse = os.environ.get("NETBOOT_VM_CLOUD_FARM")
    farm_dir = Path(reuse) if reuse else tmp_path_factory.mktemp("cloud") / "farm"
    farm = Farm(FarmConfig(farm_dir=farm_dir, nodes=plan_nodes(2, 2, "bios", "198.18.0.0/24"),
                           images_dir=IMAGES, ready_timeout=READY_BUDGET),
                report=lambda line: print(line, flush=True))
    if reuse:
        yield Cloud(farm)
        return
    pids: list[int] = []
    try:
        started = time.monotonic()
        farm.up()
        print(f"cloud farm ready after {time.monotonic() - started:.0f}s", flush=True)
        state = FarmState.load(farm.dir)
        assert state is not None
        pids = [n["pid"] for n in state.nodes] + [state.server_pid]
        yield Cloud(farm)
    except BootFailed as exc:
        pytest.fail(f"{exc.message} ({exc.hint})")
    finally:
        removed = farm.down()
    # ``farm down`` leaves nothing: no namespace (bridge, taps), no process, no state.
    assert any(r.startswith("namespace ") for r in removed), removed
    assert farm.net.namespace not in network.namespaces()
    assert not [p for p in pids if network.alive(p)], "processes survived 'down'"
    assert FarmState.load(farm.dir) is None
    assert not Path(f"/etc/netns/{farm.net.namespace}").exists()


class Instances:
    """The instance calls of the tests: the CLI, the guest map on every dom0 (``xl list``),
    ping and ssh to a guest from the farm's network."""

    def __init__(self, cloud: Cloud) -> None:
        self.cloud = cloud

    def show(self, name: str) -> dict[str, Any]:
        return self.cloud.cli("instance", "show", name)

    def wait(self, name: str, what: str, ready: Callable[[dict[str, Any]], bool],
             timeout: float = SETTLE) -> dict[str, Any]:
        return until(f"instance {name}", what, lambda: self.show(name), ready, timeout)

    def running_on(self, name: str, dom0: str, timeout: float = SETTLE) -> dict[str, Any]:
        return self.wait(name, f"running on {dom0}", lambda v: v["hostname"] == dom0
                         and v["actual"] == "running", timeout)

    def stopped(self, name: str) -> dict[str, Any]:
        """Stopped and given back: no claim, its volume detached from every dom0."""
        self.wait(name, "stopped and released", lambda v: v["node"] is None)
        disk = self.show(name)["disk"]
        self.cloud.wait(disk, "detached", lambda v: not v["attached"])
        return self.show(name)

    def domains(self) -> dict[str, dict[str, int]]:
        """dom0 -> {domain name: domid} of the domains named like instances."""
        found = {}
        for dom0 in ("dom0-1", "dom0-2"):
            out = self.cloud.ssh(dom0, "xl list")
            found[dom0] = {f[0]: int(f[1]) for f in (line.split() for line in
                                                      out.splitlines()[1:])
                           if len(f) >= 6 and f[0].startswith("nb-")}
        return found

    def ping(self, address: str, timeout: float) -> float:
        """Seconds until ``address`` answers a ping from the farm's network."""
        began = time.monotonic()
        while True:
            done = network.run(self.cloud.farm.net.cmd("ping", "-c", "1", "-W", "1", address),
                               check=False, timeout=10)
            if done.returncode == 0:
                return time.monotonic() - began
            if time.monotonic() - began > timeout:
                pytest.fail(f"{address} answered no ping within {timeout:.0f}s")

    def console(self, name: str, until_seen: bytes, timeout: float = 90
                ) -> tuple[int | None, bytes, str]:
        """``configserver instance console NAME`` as a user runs it (no ssh into any dom0):
        Enter every few seconds until ``until_seen`` shows, then Ctrl-]. Returns its exit
        status, what it showed and what it said."""
        farm = self.cloud.farm
        return drive_console(farm.net.cmd(farm.config.python, "-m", "configserver",
                                          "--state-dir", str(farm.state_dir), "instance",
                                          "console", name), until_seen, timeout)

    def ssh_up(self, address: str, timeout: float) -> float:
        """Seconds until the guest at ``address`` takes an ssh login (it answers ping a
        while before its sshd listens)."""
        began = time.monotonic()
        while network.run(self.cloud.farm.ssh_to(address, ["true"]), timeout=60,
                          check=False).returncode != 0:
            if time.monotonic() - began > timeout:
                pytest.fail(f"{address} took no ssh login within {timeout:.0f}s")
            time.sleep(3)
        return time.monotonic() - began

    def ssh(self, address: str, command: str, timeout: float = 60) -> str:
        done = network.run(self.cloud.farm.ssh_to(address, [command]), timeout=timeout,
                           check=False)
        if done.returncode != 0:
            pytest.fail(f"guest {address}: {command!r} failed ({done.returncode}): "
                        f"{done.stdout}{done.stderr}")
        return done.stdout


def scrape(cloud: Cloud, node: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What a Prometheus server sees: the config server's scrape targets with a monitor's
    certificate (made once per farm), then ``node``'s agent's /metrics at the target listed
    for it, both fetched by curl in the farm's namespace."""
    from prometheus_client.parser import text_string_to_metric_families

    bundle = cloud.farm.dir / "monitor"
    if not (bundle / f"{bundle.name}.pem").exists():
        cloud.farm.cli("user", "add", bundle.name, "--monitor", "--out", str(bundle))
    server = json.loads((cloud.farm.state_dir / "server.json").read_text())["url"]
    tls = ["--cert", str(bundle / f"{bundle.name}.pem"), "--key",
           str(bundle / f"{bundle.name}.key"), "--cacert", str(bundle / "ca.pem")]

    def curl(url: str) -> str:
        return network.run(cloud.farm.net.cmd("curl", "-sSf", "--max-time", "30", *tls, url),
                           timeout=60).stdout

    groups = json.loads(curl(f"{server}/api/v1/prometheus/targets"))
    mac = cloud.nodes[node]["mac"]
    [target] = [g["targets"][0] for g in groups if g["labels"].get("mac") == mac]
    text = curl(f"https://{target}/metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def serial_console(cloud: Cloud, node: str, until_seen: bytes, timeout: float = 120
                   ) -> tuple[int | None, bytes, str]:
    """``farm console NODE`` as a user runs it, its input a pipe (``drive_console``)."""
    import sys

    return drive_console([sys.executable, "-m", "configserver.farm", "--farm-dir",
                          str(cloud.farm.dir), "console", node], until_seen, timeout)


def drive_console(argv: list[str], until_seen: bytes, timeout: float
                  ) -> tuple[int | None, bytes, str]:
    """Run a console command with pipes: Enter every few seconds until ``until_seen`` shows
    (or ``timeout``), then Ctrl-]. Returns its exit status, what it showed and what it said."""
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    shown = bytearray()

    def read() -> None:
        while chunk := process.stdout.read1(4096):  # type: ignore[union-attr]
            shown.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while until_seen not in shown and time.monotonic() < deadline \
                and process.poll() is None:
            process.stdin.write(b"\r")  # type: ignore[union-attr]
            process.stdin.flush()  # type: ignore[union-attr]
            time.sleep(3)
        if process.poll() is None:
            process.stdin.write(b"\x1d")  # type: ignore[union-attr]
            process.stdin.flush()  # type: ignore[union-attr]
        status: int | None = process.wait(timeout=20)
    except (subprocess.TimeoutExpired, BrokenPipeError):
        process.kill()
        status = None
    reader.join(5)
    said = process.stderr.read().decode(errors="replace")  # type: ignore[union-attr]
    process.wait()
    return status, bytes(shown), said


@contextlib.contextmanager
def farm_dashboard(cloud: Cloud, port: int) -> Iterator[tuple[str, ssl.SSLContext]]:
    """``farm dashboard --port PORT`` running: (its login link, a TLS context trusting the
    farm's CA); the forwarder stops after."""
    forwarder = subprocess.Popen(
        [sys.executable, "-m", "configserver.farm", "--farm-dir", str(cloud.farm.dir),
         "dashboard", "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert forwarder.stdout is not None
        link = ""
        while not link:
            line = forwarder.stdout.readline()
            assert line, f"farm dashboard exited ({forwarder.wait(5)})"
            link = line.rsplit(" ", 1)[-1].strip() if "sign in" in line else ""
        context = ssl.create_default_context(
            cafile=str(cloud.farm.state_dir / "pki" / "ca.pem"))
        yield link, context
    finally:
        forwarder.terminate()
        forwarder.wait(10)


def ping_gaps(lines: list[str]) -> tuple[int, int, float]:
    """(answers, lost, longest silence in seconds) of ``ping -D`` output (answers only: not
    the router's "Destination Host Unreachable")."""
    seen = [(float(m[1]), int(m[2])) for line in lines
            if (m := re.match(r"\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)", line))]
    if len(seen) < 2:
        return len(seen), 0, float("inf")
    longest = max(b[0] - a[0] for a, b in itertools.pairwise(seen))
    return len(seen), seen[-1][1] - seen[0][1] + 1 - len(seen), longest


@contextlib.contextmanager
def pinging(cloud: Cloud, *addresses: str) -> Iterator[dict[str, list[str]]]:
    """Ping each address every 100 ms while the block runs; then the output lines of each.
    Into files, not pipes: nobody reads a pipe meanwhile, and a full one (some 900 lines)
    stops ping before the guest has even moved."""
    found: dict[str, list[str]] = {}
    with contextlib.ExitStack() as stack:
        logs = {a: stack.enter_context(tempfile.TemporaryFile("w+")) for a in addresses}
        pingers = [subprocess.Popen(cloud.farm.net.cmd("ping", "-D", "-i", "0.1", "-W", "1",
                                                       address),
                                    stdout=log, stderr=subprocess.DEVNULL, text=True)
                   for address, log in logs.items()]
        try:
            yield found
        finally:
            for pinger in pingers:
                pinger.send_signal(signal.SIGINT)  # ping flushes its output on SIGINT
            for pinger in pingers:
                pinger.wait(timeout=10)
            for address, log in logs.items():
                log.seek(0)
                found[address] = log.read().splitlines()
