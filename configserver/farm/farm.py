"""Farm orchestration: ``up`` (network, config server, VMs, progress), ``status`` and ``down``.

Everything a farm owns is recorded in ``<farm dir>/farm.json`` as soon as it exists, so
``status`` and ``down`` work from another shell and ``down`` can remove a half-built farm. The
config server runs inside the farm's namespace; the farm talks to it with the ``configserver``
CLI run in the same namespace.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from configserver.farm import BootFailed, CommandFailed, FarmError, console, network, qemu
from configserver.farm.network import FarmNetwork, NetworkPlan
from configserver.inventory import format_inventory

log = logging.getLogger(__name__)

STATE_FILE = "farm.json"
PROGRESS_STAGES = ("dhcp", "tftp", "script", "kernel", "initramfs", "agent", "ready")
ROLE_MEMORY_MB = {"dom0": 2560, "storage": 1536}
ROLE_CODE = {"dom0": 0xD0, "storage": 0x5A}
# A node's address follows from its role and number alone, never from the farm's layout, so a
# registry kept from a farm of another shape never has that address reserved for another MAC.
ROLE_FIRST_HOST = {"dom0": 0, "storage": 40}
MAX_PER_ROLE = 40


@dataclass(frozen=True)
class NodePlan:
    """One VM of the farm and the registry entry it boots as."""

    name: str
    role: str
    mac: str
    ip: str
    firmware: str = "bios"
    memory_mb: int = 1536
    disks: int = 0


@dataclass(frozen=True)
class FarmConfig:
    farm_dir: Path
    nodes: tuple[NodePlan, ...]
    images_dir: Path
    subnet: str = "198.18.0.0/24"
    http_port: int = 8080
    python: str = sys.executable
    ready_timeout: float = 1200.0
    disk_size: str = "4G"
    fresh: bool = False  # start from an empty registry instead of the one the last farm left
    ssh_keys: tuple[str, ...] = ()  # authorized_keys lines for root on every node, besides
    #                                 the farm's own key (``ssh`` uses that one)


def plan_nodes(dom0: int, storage: int, firmware: str | list[str], subnet: str,
               storage_disks: int = 2) -> tuple[NodePlan, ...]:
    """``dom0`` Xen nodes then ``storage`` nodes, with stable MACs and reserved addresses.

    ``firmware`` is one firmware for all, or a list cycled over the nodes in order.
    """
    firmwares = [firmware] if isinstance(firmware, str) else list(firmware)
    plan = NetworkPlan("farm-plan", subnet)
    nodes: list[NodePlan] = []
    for role, count in (("dom0", dom0), ("storage", storage)):
        if count > MAX_PER_ROLE:
            raise FarmError(f"at most {MAX_PER_ROLE} {role} nodes in a farm, not {count}")
        for index in range(count):
            number = len(nodes)
            nodes.append(NodePlan(
                name=f"{role}-{index + 1}", role=role,
                mac=f"52:54:00:fa:{ROLE_CODE[role]:02x}:{index + 1:02x}",
                ip=plan.node_ip(ROLE_FIRST_HOST[role] + index),
                firmware=firmwares[number % len(firmwares)],
                memory_mb=ROLE_MEMORY_MB[role],
                disks=storage_disks if role == "storage" else 0))
    return tuple(nodes)


def namespace_for(farm_dir: Path) -> str:
    digest = hashlib.sha256(str(farm_dir.resolve()).encode()).hexdigest()[:8]
    return f"farm-{digest}"


@dataclass
class FarmState:
    """What ``up`` created, persisted after every step."""

    namespace: str
    subnet: str
    server_pid: int | None = None
    accel: str = ""
    started: float = 0.0
    nodes: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, farm_dir: Path) -> FarmState | None:
        try:
            data = json.loads((farm_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise FarmError(f"unreadable farm state {farm_dir / STATE_FILE}: {exc}") from None
        return cls(**data)

    def save(self, farm_dir: Path) -> None:
        farm_dir.mkdir(parents=True, exist_ok=True)
        tmp = farm_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(farm_dir / STATE_FILE)


class Farm:
    """One farm directory. ``up`` builds, ``status`` reports, ``down`` removes everything."""

    def __init__(self, config: FarmConfig,
                 report: Callable[[str], None] = print) -> None:
        self.config = config
        self.dir = config.farm_dir.resolve()
        self.report = report
        self.net = FarmNetwork(NetworkPlan(namespace_for(self.dir), config.subnet))

    # -- the config server, through its CLI inside the namespace ------------------------------

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    def cli(self, *argv: str, timeout: float = 30) -> str:
        cmd = self.net.cmd(self.config.python, "-m", "configserver", "--state-dir",
                           str(self.state_dir), *argv)
        return network.run(cmd, timeout=timeout).stdout

    def cli_json(self, *argv: str) -> Any:
        return json.loads(self.cli(*argv, "--json"))

    def _write_ssh_keys(self) -> Path:
        """Root's keys on every node: the farm's own and each ``--ssh-key``; the config server
        hands them out (``serve --ssh-keys``), so a new key needs no image rebuild."""
        path = self.dir / "ssh" / "authorized_keys"
        keys = (self._farm_key().read_text(), *self.config.ssh_keys)
        path.write_text(authorized_keys(keys))
        return path

    def _start_server(self, state: FarmState) -> subprocess.Popen:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        keys = self._write_ssh_keys()
        low, high = self.net.plan.pool()
        instances = self.net.plan.instance_pool()
        argv = self.net.cmd(
            self.config.python, "-m", "configserver", "serve", "--state-dir", str(self.state_dir),
            "--images", str(self.config.images_dir), "--http-port", str(self.config.http_port),
            "--interface", network.BRIDGE, "--dhcp", "full", "--pool", f"{low}-{high}",
            "--tftp", "on", "--ssh-keys", str(keys),
            *(("--instance-pool", f"{instances[0]}-{instances[1]}") if instances else ()))
        log.info("starting config server: %s", " ".join(argv))
        with open(self.dir / "configserver.log", "ab") as out:
            server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        state.server_pid = server.pid
        state.save(self.dir)
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise FarmError(f"the config server exited ({server.returncode})",
                                hint=f"see {self.dir / 'configserver.log'}")
            with contextlib.suppress(CommandFailed):
                self.cli("node", "list", timeout=10)
                return server
            if time.monotonic() > deadline:
                raise FarmError("the config server did not answer within 60 s",
                                hint=f"see {self.dir / 'configserver.log'}")
            time.sleep(0.5)

    # -- up ---------------------------------------------------------------------------------------

    def up(self, *, wait: bool = True) -> list[dict[str, Any]]:
        existing = FarmState.load(self.dir)
        if existing is not None or self.net.exists():
            raise FarmError(f"a farm is already up in {self.dir}",
                            hint="see 'status', or run 'down' first")
        missing = [n.role for n in self.config.nodes
                   if not (self.config.images_dir / n.role).is_dir()]
        if missing:
            raise FarmError(f"no image for role(s) {', '.join(sorted(set(missing)))} in "
                            f"{self.config.images_dir}", hint="run 'make images'")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.report("probing acceleration (KVM is used only if a trial VM runs)...")
        host = qemu.probe()
        state = FarmState(namespace=self.net.namespace, subnet=self.config.subnet,
                          accel=str(host.accel), started=time.time())
        state.save(self.dir)
        try:
            self.net.create()
            self.report(f"network: namespace {self.net.namespace}, bridge {network.BRIDGE} "
                        f"{self.net.plan.server_ip}/{self.net.plan.prefixlen}, "
                        f"accel {host.accel}")
            if self.config.fresh and self.state_dir.exists():
                shutil.rmtree(self.state_dir)
                self.report(f"state: {self.state_dir} removed (--fresh)")
            self._start_server(state)
            self._register()
            for index, node in enumerate(self.config.nodes):
                state.nodes.append(self._boot(index, node, host))
                state.save(self.dir)
        except BaseException:
            self.report("farm start failed: removing what was built")
            self.down()
            raise
        if not wait:
            return self.rows(state)
        return self.wait_ready(state)

    def _register(self) -> None:
        """Declare the farm's nodes: created, or updated in a registry kept from an earlier farm.

        ``apply`` without ``--prune``: whatever else an operator registered in the farm's state
        directory stays as it is.
        """
        inventory = self.dir / "inventory.toml"
        inventory.write_text(format_inventory({"nodes": [
            {"mac": n.mac, "role": n.role, "hostname": n.name, "ip": n.ip}
            for n in self.config.nodes]}))
        self.cli("apply", "-f", str(inventory))

    @property
    def ssh_key(self) -> Path:
        return self.dir / "ssh" / "id_ed25519"

    def _farm_key(self) -> Path:
        """The farm's own SSH key pair (made once, kept across ``down``): its public half."""
        if not self.ssh_key.is_file():
            self.ssh_key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            network.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                         f"netboot-farm@{self.net.namespace}", "-f", str(self.ssh_key)])
        return self.ssh_key.with_suffix(".pub")

    def ssh_command(self, name: str, command: Sequence[str] = ()) -> list[str]:
        """``ssh`` into farm node ``name`` from inside the farm's namespace, as root."""
        return self.ssh_to(self._node(self._loaded(), name)["ip"], command)

    def console_socket(self, name: str) -> Path:
        """The unix socket of ``name``'s serial console (``farm console``)."""
        self._node(self._loaded(), name)
        path = console.socket_for(self.dir / "vms" / name)
        if path is None:
            raise FarmError(f"{name} has no console socket: the farm directory's path is too "
                            "long for one", hint="use a shorter --farm-dir; its serial log "
                            f"is {self.dir / 'vms' / name / 'serial.log'}")
        if not path.exists():
            raise FarmError(f"{name} is not running", hint=f"farm power-on {name}")
        return path

    def ssh_to(self, address: str, command: Sequence[str] = ()) -> list[str]:
        """``ssh`` as root, with the farm's key, to any address on the farm's network (an
        instance's, say), from inside the farm's namespace."""
        return self.net.cmd("ssh", "-i", str(self.ssh_key), "-o", "StrictHostKeyChecking=no",
                            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                            "-o", "ConnectTimeout=10", f"root@{address}", *command)

    def _boot(self, index: int, node: NodePlan, host: qemu.HostQemu) -> dict[str, Any]:
        tap = self.net.add_tap(f"tap{index}")
        return self._start_vm(node, tap, host)

    def _start_vm(self, node: NodePlan, tap: str, host: qemu.HostQemu) -> dict[str, Any]:
        vm_dir = self.dir / "vms" / node.name
        vm_dir.mkdir(parents=True, exist_ok=True)
        firmware = qemu.Firmware(node.firmware)
        spec = qemu.VmSpec(
            name=node.name, mac=node.mac, tap=tap, serial_log=vm_dir / "serial.log",
            memory_mb=node.memory_mb, firmware=firmware, xen=node.role == "dom0",
            disks=tuple(vm_dir / f"disk{d}.qcow2" for d in range(node.disks)),
            vars_file=vm_dir / "OVMF_VARS.fd" if firmware is not qemu.Firmware.BIOS else None,
            console=console.socket_for(vm_dir))
        qemu.prepare(spec, self.config.disk_size)
        proc = qemu.start(spec, host, self.net.cmd(), vm_dir / "qemu.log")
        self.report(f"{node.name}: powered on ({node.mac}, {node.role}, {node.firmware})")
        return {**asdict(node), "tap": tap, "pid": proc.pid, "power_on": time.time(),
                "serial_log": str(spec.serial_log)}

    # -- one node's power -------------------------------------------------------------------------

    def _node(self, state: FarmState, name: str) -> dict[str, Any]:
        node = next((n for n in state.nodes if n["name"] == name), None)
        if node is None:
            names = ", ".join(n["name"] for n in state.nodes) or "none"
            raise FarmError(f"no farm node {name!r}", hint=f"nodes: {names}")
        return node

    def power_off(self, name: str) -> dict[str, Any]:
        """Pull the plug on ``name``: SIGKILL its QEMU (a hard crash; its disks stay)."""
        state = self._loaded()
        node = self._node(state, name)
        if _is_ours(node["pid"], self.dir, self.net.namespace):
            network.kill_now(node["pid"])
            self.report(f"{name}: powered off (QEMU {node['pid']} killed)")
        return node

    def power_on(self, name: str, *, wait: bool = True) -> list[dict[str, Any]]:
        """Boot ``name`` again (same MAC, tap and disks) after ``power_off`` or a crash."""
        state = self._loaded()
        node = self._node(state, name)
        if _is_ours(node["pid"], self.dir, self.net.namespace):
            raise FarmError(f"{name} is running (QEMU {node['pid']})",
                            hint="power it off first")
        plan = NodePlan(**{k: node[k] for k in ("name", "role", "mac", "ip", "firmware",
                                                "memory_mb", "disks")})
        binary = shutil.which(qemu.QEMU) or qemu.QEMU
        started = self._start_vm(plan, node["tap"], qemu.HostQemu(qemu.Accel(state.accel),
                                                                  binary))
        state.nodes[state.nodes.index(node)] = started
        state.save(self.dir)
        if not wait:
            return self.rows(state)
        return self.wait_ready(FarmState(**{**asdict(state), "nodes": [started]}))

    def restart_server(self, *, hard: bool = True) -> int:
        """Stop the config server (SIGKILL with ``hard``: a crash) and start it again on the
        same state directory; the new pid."""
        state = self._loaded()
        if state.server_pid and _is_ours(state.server_pid, self.dir, self.net.namespace):
            if hard:
                network.kill_now(state.server_pid)
            else:
                network.stop_pids([state.server_pid])
        self.report(f"config server {state.server_pid} stopped; starting it again")
        server = self._start_server(state)
        return server.pid

    def _loaded(self) -> FarmState:
        state = FarmState.load(self.dir)
        if state is None:
            raise FarmError(f"no farm is up in {self.dir}", hint="start one with 'up'")
        return state

    # -- progress ---------------------------------------------------------------------------------

    def node_view(self, mac: str) -> dict[str, Any]:
        return self.cli_json("node", "show", mac)

    def wait_ready(self, state: FarmState) -> list[dict[str, Any]]:
        """Print each node's stages as they happen; return the final rows when all are ready."""
        seen: dict[str, set[str]] = {n["mac"]: set() for n in state.nodes}
        deadline = time.monotonic() + self.config.ready_timeout
        while True:
            all_ready = True
            for node in state.nodes:
                view = self.node_view(node["mac"])
                steps = this_boot(view.get("timeline", []), node["power_on"])
                for step in steps:
                    stage = step.get("stage")
                    if stage in seen[node["mac"]]:
                        continue
                    seen[node["mac"]].add(stage)
                    offset = step.get("time", 0) - node["power_on"]
                    self.report(f"{node['name']}: {stage:<9} +{offset:6.1f}s")
                # A registry kept from an earlier farm may still say ``ready``: only a ready
                # stage of this power-on counts.
                if view.get("state") != "ready" or "ready" not in seen[node["mac"]]:
                    all_ready = False
                    self._check_alive(node)
            if all_ready:
                return self.rows(state)
            if time.monotonic() > deadline:
                raise BootFailed(f"not every node was ready within "
                                 f"{self.config.ready_timeout:.0f}s",
                                 hint=f"serial logs in {self.dir / 'vms'}; the farm stays up "
                                      "until 'down'")
            time.sleep(2)

    def _check_alive(self, node: dict[str, Any]) -> None:
        serial = qemu.SerialLog(Path(node["serial_log"]))
        fatal = serial.fatal_line()
        if fatal:
            raise BootFailed(f"{node['name']}: {fatal}",
                             hint=f"see {serial.path}; the farm stays up until 'down'")
        if not network.alive(node["pid"]):
            raise BootFailed(f"{node['name']}: QEMU exited",
                             hint=f"see {Path(node['serial_log']).parent / 'qemu.log'}")

    def rows(self, state: FarmState) -> list[dict[str, Any]]:
        """One row per node: MAC, role, IP, state, power-on -> ready (from the registry)."""
        try:
            listed = {n["mac"]: n for n in self.cli_json("node", "list")}
        except (CommandFailed, ValueError):
            listed = {}
        rows = []
        for node in state.nodes:
            entry = listed.get(node["mac"], {})
            ready_at = None
            if entry.get("state") == "ready":
                with contextlib.suppress(CommandFailed, ValueError):
                    timeline = this_boot(self.node_view(node["mac"]).get("timeline", []),
                                         node["power_on"])
                    ready_at = next((s["time"] for s in timeline if s["stage"] == "ready"), None)
            vm = "running" if network.alive(node["pid"]) else "stopped"
            rows.append({
                "name": node["name"], "mac": node["mac"], "role": node["role"],
                "ip": entry.get("ip") or node["ip"], "state": entry.get("state", "unknown"),
                "firmware": node["firmware"], "vm": vm,
                "ready_seconds": round(ready_at - node["power_on"], 1) if ready_at else None})
        return rows

    # -- status and down --------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        state = FarmState.load(self.dir)
        if state is None:
            raise FarmError(f"no farm is up in {self.dir}", hint="start one with 'up'")
        return self.rows(state)

    def cpu(self, seconds: float = 30.0) -> list[dict[str, Any]]:
        """Each VM's QEMU CPU use over ``seconds`` (share of one core): what a node costs the
        host while it sits there."""
        state = FarmState.load(self.dir)
        if state is None:
            raise FarmError(f"no farm is up in {self.dir}", hint="start one with 'up'")
        before = {n["name"]: cpu_seconds(n["pid"]) for n in state.nodes}
        started = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        rows = []
        for node in state.nodes:
            used = cpu_seconds(node["pid"])
            first = before[node["name"]]
            share = (used - first) / elapsed if used is not None and first is not None else None
            rows.append({"name": node["name"], "role": node["role"],
                         "cpu_share": round(share, 3) if share is not None else None,
                         "seconds": round(elapsed, 1)})
        return rows

    def down(self) -> list[str]:
        """Stop every VM and the server, delete the namespace; return what was removed."""
        state = FarmState.load(self.dir)
        removed: list[str] = []
        pids = []
        if state is not None:
            pids = [n["pid"] for n in state.nodes]
            if state.server_pid:
                pids.append(state.server_pid)
        own = [p for p in pids if _is_ours(p, self.dir, self.net.namespace)]
        network.stop_pids(own)
        removed += [f"process {p}" for p in own]
        if self.net.exists():
            self.net.destroy()
            removed.append(f"namespace {self.net.namespace}")
        with contextlib.suppress(FileNotFoundError):
            (self.dir / STATE_FILE).unlink()
        return removed


def authorized_keys(keys: Sequence[str]) -> str:
    """An ``authorized_keys`` text of public-key files' contents; anything else is refused."""
    lines = [line.strip() for key in keys for line in key.splitlines()
             if line.strip() and not line.startswith("#")]
    bad = [line for line in lines if not line.startswith(("ssh-", "ecdsa-", "sk-"))]
    if bad or not lines:
        raise FarmError(f"not an SSH public key: {(bad or [''])[0][:40]!r}",
                        hint="give the .pub file of a key (ssh-ed25519 AAAA...)")
    return "".join(f"{line}\n" for line in lines)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads), or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the ")": state is field 3, utime 14, stime 15 (proc(5)); index = field - 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def this_boot(timeline: list[dict[str, Any]], power_on: float) -> list[dict[str, Any]]:
    """The timeline's stages since the VM was powered on (not an earlier farm's boot)."""
    return [step for step in timeline if step.get("time", 0) >= power_on - 1.0]


def _is_ours(pid: int, farm_dir: Path, namespace: str) -> bool:
    """True if ``pid`` still runs one of this farm's commands (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return str(farm_dir) in cmdline or namespace in cmdline


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("NODE", "MAC", "ROLE", "IP", "STATE", "FIRMWARE", "VM", "READY AFTER")
    body = [(r["name"], r["mac"], r["role"], r["ip"] or "-", r["state"], r["firmware"], r["vm"],
             f"{r['ready_seconds']:.1f}s" if r["ready_seconds"] is not None else "-")
            for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in (head, *body))
