"""QEMU command lines for farm VMs, acceleration detection and serial-log watching.

Firmware per VM:

* ``bios``: SeaBIOS with QEMU's iPXE option ROM for virtio-net (Debian's ipxe-qemu).
* ``uefi``: OVMF with the same iPXE ROM (its EFI driver).
* ``uefi-pxe``: OVMF with no option ROM, so the firmware's own UEFI PXE fetches iPXE over TFTP.
* ``uefi-http``: ``uefi-pxe`` with OVMF's IPv6 PXE turned off (fw_cfg): facing a server without
  TFTP, its IPv4 PXE finds no boot file and the firmware falls through to UEFI HTTP Boot a
  minute sooner than through IPv6 PXE too.

The serial console goes to one log file per VM. KVM is used only when a trial run proves that a
vCPU really executes under it (SeaBIOS writes its banner to the debug console); otherwise TCG.
"""

from __future__ import annotations

import enum
import logging
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from configserver.farm import BootFailed, FarmError
from configserver.farm.network import run

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")

# Console lines that mean a boot cannot succeed any more: stop waiting at once.
FATAL_PATTERNS = (
    r"Kernel panic - not syncing",
    r"\(XEN\) Panic on CPU",
    r"No bootable device",
    r"Boot Failed\. EFI Network",
    r"Could not boot image",
    r"No more network devices",
)


class Firmware(enum.StrEnum):
    BIOS = "bios"
    UEFI = "uefi"
    UEFI_PXE = "uefi-pxe"
    UEFI_HTTP = "uefi-http"


class Accel(enum.StrEnum):
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class VmSpec:
    """One VM of the farm; paths are inside the farm directory."""

    name: str
    mac: str
    tap: str
    serial_log: Path
    memory_mb: int = 1536
    cpus: int = 1
    firmware: Firmware = Firmware.BIOS
    xen: bool = False
    disks: tuple[Path, ...] = ()
    vars_file: Path | None = None
    # The serial console's unix socket ('farm console'); the log gets everything either way.
    console: Path | None = None


@dataclass(frozen=True)
class HostQemu:
    """What this host's QEMU can do; probe it once with :func:`probe`."""

    accel: Accel
    binary: str = QEMU


def probe(timeout: float = 8.0) -> HostQemu:
    """KVM if a trial VM really runs SeaBIOS under it within ``timeout``, else TCG."""
    binary = shutil.which(QEMU)
    if not binary:
        raise FarmError(f"{QEMU} not found", hint="apt-get install qemu-system-x86")
    return HostQemu(Accel.KVM if _kvm_works(binary, timeout) else Accel.TCG, binary)


# QEMU complaints that mean KVM is present but not usable (broken nested virtualisation).
KVM_BROKEN = ("KVM internal error", "emulation failure", "doesn't support requested feature",
              "failed to initialize kvm", "Could not access KVM")


def _kvm_works(binary: str, timeout: float) -> bool:
    """Run SeaBIOS and the iPXE ROM (a NIC with no peer) under KVM for a few seconds.

    KVM counts as working only if SeaBIOS reaches the option ROM and QEMU reports no KVM
    trouble: on some hosts /dev/kvm opens, then the first protected-mode code fails.
    """
    with tempfile.TemporaryDirectory(prefix="farm-kvm-") as tmp:
        debug_log, err_log = Path(tmp) / "debugcon.log", Path(tmp) / "stderr.log"
        argv = [binary, "-accel", "kvm", "-machine", "pc", "-m", "64", "-display", "none",
                "-nodefaults", "-no-reboot", "-monitor", "none", "-serial", "none",
                "-debugcon", f"file:{debug_log}", "-global", "isa-debugcon.iobase=0x402",
                "-device", "virtio-net-pci", "-boot", "order=n"]
        try:
            with open(err_log, "wb") as err:
                proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                        start_new_session=True)
        except OSError:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.25)
        exited = proc.poll() is not None
        proc.kill()
        proc.wait(5)
        booted = debug_log.exists() and b"Booting from ROM" in debug_log.read_bytes()
        complaints = err_log.read_text(errors="replace")
    works = booted and not exited and not any(c in complaints for c in KVM_BROKEN)
    log.info("KVM %s", "works" if works else "is not usable here: using TCG")
    return works


def command_line(vm: VmSpec, host: HostQemu) -> list[str]:
    """The full QEMU argv for ``vm`` (to be run inside the farm namespace)."""
    # SeaBIOS on q35 does not run the NIC's option ROM here; i440fx (pc) does.
    machine = "pc" if vm.firmware is Firmware.BIOS else "q35"
    argv = [host.binary, "-name", vm.name, "-machine", machine, "-accel", str(host.accel)]
    if host.accel is Accel.KVM:
        argv += ["-cpu", "host"]
    elif vm.xen:
        argv += ["-cpu", "qemu64,+svm"]  # Xen's PV dom0 crashes early under TCG with -cpu max
    else:
        argv += ["-cpu", "max"]
    argv += ["-m", str(vm.memory_mb), "-smp", str(vm.cpus), "-display", "none", "-nodefaults",
             "-monitor", "none", *serial_args(vm)]
    if vm.firmware is Firmware.BIOS:
        argv += ["-boot", "order=n"]
    else:
        if vm.vars_file is None:
            raise FarmError(f"{vm.name}: UEFI needs a copy of the OVMF variables")
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={vm.vars_file}"]
    # QEMU's default ROM for virtio-net is ipxe-qemu's efi-virtio.rom (legacy PXE and EFI
    # driver in one); naming it explicitly stopped SeaBIOS from running it on this QEMU.
    nic = f"virtio-net-pci,netdev=net0,mac={vm.mac}"
    if vm.firmware in (Firmware.UEFI_PXE, Firmware.UEFI_HTTP):
        nic += ",romfile="
    if vm.firmware is Firmware.UEFI_HTTP:
        argv += ["-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n"]
    argv += ["-netdev", f"tap,id=net0,ifname={vm.tap},script=no,downscript=no",
             "-device", nic]
    for index, disk in enumerate(vm.disks):
        argv += ["-drive", f"file={disk},if=none,id=disk{index},format=qcow2",
                 "-device", f"virtio-blk-pci,drive=disk{index},serial=farm-disk{index}"]
    return argv


def serial_args(vm: VmSpec) -> list[str]:
    """The serial port: a log file, and with ``console`` also a unix socket one client at a
    time may attach to (QEMU's socket chardev, its ``logfile`` taking every byte the VM
    writes, attached or not)."""
    if vm.console is None:
        return ["-serial", f"file:{vm.serial_log}"]
    for path in (vm.console, vm.serial_log):
        if "," in str(path):
            raise FarmError(f"{vm.name}: QEMU options cannot name {path} (a comma)")
    return ["-chardev", f"socket,id=serial0,path={vm.console},server=on,wait=off,"
                        f"logfile={vm.serial_log}", "-serial", "chardev:serial0"]


def prepare(vm: VmSpec, disk_size: str = "4G") -> None:
    """Create the VM's files: empty serial log, OVMF variables copy, qcow2 disks."""
    vm.serial_log.parent.mkdir(parents=True, exist_ok=True)
    vm.serial_log.write_bytes(b"")
    if vm.console is not None:
        vm.console.unlink(missing_ok=True)  # a stale one from a VM that was killed
    if vm.vars_file is not None and not vm.vars_file.exists():
        shutil.copyfile(OVMF_VARS, vm.vars_file)
    for disk in vm.disks:
        if not disk.exists():
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), disk_size])


def start(vm: VmSpec, host: HostQemu, namespace_cmd: Sequence[str],
          stderr_log: Path) -> subprocess.Popen:
    """Start the VM inside the namespace (``namespace_cmd`` is e.g. ``ip netns exec NS``)."""
    argv = [*namespace_cmd, *command_line(vm, host)]
    log.info("starting %s (%s, %s): %s", vm.name, vm.mac, vm.firmware, " ".join(argv))
    with open(stderr_log, "ab") as err:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                start_new_session=True)


class SerialLog:
    """Reads a VM's serial log incrementally and waits for marker lines."""

    def __init__(self, path: Path, fatal: Sequence[str] = FATAL_PATTERNS) -> None:
        self.path = path
        self.fatal = [re.compile(p) for p in fatal]

    def text(self) -> str:
        try:
            return self.path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""

    def fatal_line(self) -> str | None:
        text = self.text()
        for pattern in self.fatal:
            match = pattern.search(text)
            if match:
                start = text.rfind("\n", 0, match.start()) + 1
                end = text.find("\n", match.end())
                return text[start:end if end >= 0 else None].strip()
        return None

    def wait_for(self, pattern: str, timeout: float, *,
                 proc: subprocess.Popen | None = None) -> re.Match[str]:
        """Wait until ``pattern`` appears; fail fast on a fatal line or a dead QEMU."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            match = regex.search(text)
            if match:
                return match
            fatal = self.fatal_line()
            if fatal:
                raise BootFailed(f"{self.path.name}: {fatal}\n{self.tail()}")
            if proc is not None and proc.poll() is not None:
                # Give the log one last read: the marker may land just before poweroff.
                match = regex.search(self.text())
                if match:
                    return match
                raise BootFailed(f"{self.path.name}: QEMU exited ({proc.returncode}) "
                                 f"before /{pattern}/\n{self.tail()}")
            if time.monotonic() > deadline:
                raise BootFailed(f"{self.path.name}: no /{pattern}/ within {timeout:.0f}s\n"
                                 f"{self.tail()}")
            time.sleep(0.5)

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.text().splitlines()[-lines:])
