"""The farm's private network: one namespace holding a bridge and one tap per VM.

Nothing is created on the host's interfaces. The bridge carries the config server's address
(``198.18.0.1/24`` by default, from the benchmarking range 198.18.0.0/15); QEMU runs inside the
namespace and opens its tap there. Deleting the namespace removes the bridge and every tap.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from configserver.farm import CommandFailed, FarmError

log = logging.getLogger(__name__)

FARM_RANGE = ipaddress.ip_network("198.18.0.0/15")
BRIDGE = "br0"


def run(argv: Sequence[str], *, timeout: float = 60, check: bool = True,
        input_text: str | None = None) -> subprocess.CompletedProcess:
    """Run a system tool, raising CommandFailed with its stderr when it fails."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              check=False, input=input_text)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandFailed(f"{argv[0]}: {exc}") from exc
    if check and proc.returncode != 0:
        raise CommandFailed(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


@dataclass(frozen=True)
class NetworkPlan:
    """Addresses of one farm network; ``subnet`` must lie inside 198.18.0.0/15."""

    namespace: str
    subnet: str = "198.18.0.0/24"

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.subnet)
        if not net.subnet_of(FARM_RANGE):  # type: ignore[arg-type]
            raise FarmError(f"subnet {self.subnet} is outside {FARM_RANGE}")
        if net.num_addresses < 16:
            raise FarmError(f"subnet {self.subnet} is too small for a farm")

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def server_ip(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen

    def node_ip(self, index: int) -> str:
        """The reserved address of the farm's ``index``-th node (from .10 on)."""
        addr = self.network.network_address + 10 + index
        if addr not in self.network or addr == self.network.broadcast_address:
            raise FarmError(f"node {index} does not fit in {self.subnet}")
        return str(addr)

    def pool(self) -> tuple[str, str]:
        """A dynamic pool in the upper half of the subnet, for clients without a reservation."""
        net = self.network
        half = net.num_addresses // 2
        return str(net.network_address + half), str(net.broadcast_address - 1)

    def instance_pool(self) -> tuple[str, str] | None:
        """The instances' addresses: the quarter of the lower half just below the dynamic
        pool (.96-.127 of a /24), clear of the nodes' (.10 on); None in a subnet under /26."""
        net = self.network
        if net.num_addresses < 64:
            return None
        half = net.num_addresses // 2
        return str(net.network_address + half - half // 4), str(net.network_address + half - 1)


class Namespace:
    """A named network namespace with its own ``/etc/netns/NAME/resolv.conf`` (so tools run in
    it never use the host's resolver), and ``lo`` up. Every method is safe to call again.

    The farm, the vm-tier tests, the netns-tier tests and the benchmarks all make their
    namespaces through this class.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def namespace(self) -> str:
        return self.name

    @property
    def etc(self) -> Path:
        return Path("/etc/netns") / self.name

    def exists(self) -> bool:
        return self.name in namespaces()

    def create(self) -> None:
        if self.exists():
            raise FarmError(f"namespace {self.name} already exists", hint="run 'down' first")
        run(["ip", "netns", "add", self.name])
        try:
            self.etc.mkdir(parents=True, exist_ok=True)
            (self.etc / "resolv.conf").write_text(f"# namespace {self.name}: no resolver\n")
            self.ip("link", "set", "lo", "up")
        except (FarmError, OSError):
            self.destroy()
            raise

    def ip(self, *argv: str) -> subprocess.CompletedProcess:
        return run(["ip", "-n", self.name, *argv])

    def cmd(self, *argv: str) -> list[str]:
        """``argv`` prefixed to run inside the namespace (``ip netns exec`` execs in place)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def pids(self) -> list[int]:
        out = run(["ip", "netns", "pids", self.name], check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def destroy(self, grace: float = 3.0) -> None:
        """Stop whatever runs inside, then delete the namespace (its links go with it)."""
        if self.exists():
            stop_pids(self.pids(), grace)
            run(["ip", "netns", "del", self.name], check=False)
        with contextlib.suppress(OSError):
            for child in self.etc.iterdir():
                child.unlink()
            self.etc.rmdir()


def veth_pair(a: Namespace, b: Namespace, addr_a: str = "", addr_b: str = "", *,
              name_a: str = "eth0", name_b: str = "eth0") -> None:
    """Join two namespaces by a veth pair made inside ``a`` and moved into ``b`` (never on the
    host); ``addr_*`` (CIDR) are optional."""
    tmp = f"vb{os.urandom(3).hex()}"
    a.ip("link", "add", name_a, "type", "veth", "peer", "name", tmp)
    a.ip("link", "set", tmp, "netns", b.name)
    b.ip("link", "set", tmp, "name", name_b)
    for ns, name, addr in ((a, name_a, addr_a), (b, name_b, addr_b)):
        if addr:
            ns.ip("addr", "add", addr, "dev", name)
        ns.ip("link", "set", name, "up")


class FarmNetwork(Namespace):
    """The namespace of a farm, its bridge and one tap per VM."""

    def __init__(self, plan: NetworkPlan) -> None:
        super().__init__(plan.namespace)
        self.plan = plan

    def create(self) -> None:
        super().create()
        try:
            self.ip("link", "add", BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state",
                    "0")
            self.ip("addr", "add", f"{self.plan.server_ip}/{self.plan.prefixlen}", "dev", BRIDGE)
            self.ip("link", "set", BRIDGE, "up")
        except FarmError:
            self.destroy()
            raise
        log.info("farm network %s: bridge %s at %s", self.name, BRIDGE, self.plan.server_ip)

    def add_tap(self, name: str) -> str:
        self.ip("tuntap", "add", "dev", name, "mode", "tap")
        self.ip("link", "set", name, "master", BRIDGE)
        self.ip("link", "set", name, "up")
        return name

    def attach(self, other: Namespace, name: str, addr: str = "") -> None:
        """A veth from the bridge into ``other`` (as its ``eth0``), e.g. a separate DHCP
        server's namespace."""
        veth_pair(self, other, "", addr, name_a=name)
        self.ip("link", "set", name, "master", BRIDGE)

    def taps(self) -> list[str]:
        out = run(["ip", "-n", self.name, "-o", "link", "show", "type", "tun"],
                  check=False).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
                if line.count(":") >= 2]


def namespaces() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def stop_pids(pids: Sequence[int], grace: float = 3.0) -> None:
    """SIGTERM the given processes, then SIGKILL those still running after ``grace`` seconds."""
    running = [p for p in pids if _signal(p, signal.SIGTERM)]
    deadline = time.monotonic() + grace
    while running and time.monotonic() < deadline:
        time.sleep(0.1)
        running = [p for p in running if alive(p)]
    for pid in running:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while running and time.monotonic() < deadline:
        time.sleep(0.05)
        running = [p for p in running if alive(p)]


def kill_now(pid: int, timeout: float = 5.0) -> None:
    """SIGKILL ``pid`` (no chance to clean up: a pulled plug for a VM) and wait until it is gone."""
    _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
