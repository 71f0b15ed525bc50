"""vm tier: QEMU (TCG unless KVM really works) PXE-boots through the config server.

``BootLab`` is one throwaway namespace with a bridge, the config server on it, and VMs on taps;
closing it stops every process it started and deletes the namespace (bridge and taps with it).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudfarm
import netlab
import pytest
import testimage

from configserver.farm import network, qemu
from configserver.farm.network import FarmNetwork, NetworkPlan

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cloudfarm.Cloud]:
    """The cloud farm (``cloudfarm.boot_cloud``), shared by ``test_volumes.py`` and
    ``test_volumes_migration.py``, which come last in the tier and run in that order: the
    second's guests are the first's."""
    yield from cloudfarm.boot_cloud(tmp_path_factory)


@pytest.fixture(scope="session")
def host_qemu() -> qemu.HostQemu:
    return qemu.probe()


@pytest.fixture(scope="session")
def test_image() -> testimage.TestImage:
    try:
        return testimage.build()
    except testimage.TestImageError as exc:
        pytest.fail(f"cannot build the test kernel fixture: {exc}")


class BootLab:
    """A namespace with bridge ``br0`` at 198.18.0.1/24, the config server and VMs."""

    def __init__(self, workdir: Path, host: qemu.HostQemu) -> None:
        self.workdir = workdir
        self.host = host
        self.net = FarmNetwork(NetworkPlan(f"vmt-{secrets.token_hex(3)}"))
        self.net.create()
        self.procs: list[subprocess.Popen] = []
        self.extra_namespaces: list[network.Namespace] = []
        self.state_dir = workdir / "state"
        self.server: subprocess.Popen | None = None
        self.taps = 0

    @property
    def server_ip(self) -> str:
        return self.net.plan.server_ip

    def spawn(self, argv: list[str], log_name: str, netns: network.Namespace | None = None
              ) -> subprocess.Popen:
        ns = netns or self.net
        with open(self.workdir / log_name, "ab") as out:
            proc = subprocess.Popen(ns.cmd(*argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_server(self, images: Path, *args: str) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.server = self.spawn(
            [sys.executable, "-m", "configserver", "serve", "--state-dir", str(self.state_dir),
             "--images", str(images), "--http-port", "8080", "--interface", network.BRIDGE,
             *args], "configserver.log")
        netlab.wait_for(lambda: self.cli("node", "list", check=False).returncode == 0, 60,
                        "the config server", step=0.5, process=self.server,
                        log=self.workdir / "configserver.log")

    def cli(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            self.net.cmd(sys.executable, "-m", "configserver", "--state-dir",
                         str(self.state_dir), *argv),
            capture_output=True, text=True, timeout=30, check=False, cwd=ROOT)
        if check and proc.returncode != 0:
            pytest.fail(f"configserver {' '.join(argv)}: {proc.stderr.strip()}")
        return proc

    def node(self, mac: str) -> dict[str, Any]:
        return json.loads(self.cli("node", "show", mac, "--json").stdout)

    def stages(self, mac: str) -> list[str]:
        return [e["stage"] for e in self.node(mac).get("events", [])]

    def boot_vm(self, name: str, mac: str, *, firmware: qemu.Firmware = qemu.Firmware.BIOS,
                memory_mb: int = 512, xen: bool = False, disks: int = 0
                ) -> tuple[subprocess.Popen, qemu.SerialLog]:
        tap = self.net.add_tap(f"tap{self.taps}")
        self.taps += 1
        vm_dir = self.workdir / name
        vm_dir.mkdir(parents=True, exist_ok=True)
        spec = qemu.VmSpec(
            name=name, mac=mac, tap=tap, serial_log=vm_dir / "serial.log", memory_mb=memory_mb,
            firmware=firmware, xen=xen,
            disks=tuple(vm_dir / f"disk{i}.qcow2" for i in range(disks)),
            vars_file=vm_dir / "OVMF_VARS.fd" if firmware is not qemu.Firmware.BIOS else None)
        qemu.prepare(spec, "1G")
        proc = qemu.start(spec, self.host, self.net.cmd(), vm_dir / "qemu.log")
        self.procs.append(proc)
        return proc, qemu.SerialLog(spec.serial_log)

    def side_namespace(self, peer_ip: str) -> network.Namespace:
        """Another namespace joined to the bridge by a veth (e.g. a separate DHCP server)."""
        side = network.Namespace(f"vms-{secrets.token_hex(3)}")
        side.create()
        self.extra_namespaces.append(side)
        self.net.attach(side, f"vs{len(self.extra_namespaces)}", f"{peer_ip}/24")
        return side

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.workdir / name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        network.stop_pids([p.pid for p in self.procs if p.poll() is None])
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        for side in self.extra_namespaces:
            side.destroy()
        self.net.destroy()


@pytest.fixture
def boot_lab(tmp_path: Path, host_qemu: qemu.HostQemu) -> Iterator[BootLab]:
    lab = BootLab(tmp_path, host_qemu)
    try:
        yield lab
    finally:
        lab.close()
        assert lab.net.namespace not in network.namespaces()
