"""Unit tier (no processes): the farm's pure parts, QEMU argv and node plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from configserver.farm import FarmError, qemu
from configserver.farm.farm import format_table, plan_nodes
from configserver.farm.network import NetworkPlan

TCG = qemu.HostQemu(qemu.Accel.TCG, "qemu-system-x86_64")


def _vm(**kw) -> qemu.VmSpec:
    return qemu.VmSpec(name="n1", mac="52:54:00:fa:d0:01", tap="tap0",
                       serial_log=Path("/f/serial.log"), **kw)


def test_bios_vm_uses_pc_machine_and_default_ipxe_rom():
    argv = qemu.command_line(_vm(), TCG)
    assert argv[argv.index("-machine") + 1] == "pc"
    assert "-boot" in argv and "order=n" in argv
    nic = argv[argv.index("-device") + 1]
    assert nic == "virtio-net-pci,netdev=net0,mac=52:54:00:fa:d0:01"
    assert "file:/f/serial.log" in argv


def test_a_console_socket_serves_the_serial_port_and_still_logs_it():
    argv = qemu.command_line(_vm(console=Path("/f/console.sock")), TCG)
    assert argv[argv.index("-chardev") + 1] == (
        "socket,id=serial0,path=/f/console.sock,server=on,wait=off,logfile=/f/serial.log")
    assert argv[argv.index("-serial") + 1] == "chardev:serial0"
    with pytest.raises(FarmError, match="comma"):
        qemu.command_line(_vm(console=Path("/f/a,b.sock")), TCG)


def test_a_farm_directory_too_long_for_a_socket_gets_no_console():
    from configserver.farm.console import socket_for

    assert socket_for(Path("/work/farm/vms/dom0-1")) == Path("/work/farm/vms/dom0-1/console.sock")
    assert socket_for(Path("/" + "x" * 90) / "vms" / "dom0-1") is None


def test_xen_node_under_tcg_gets_svm_cpu():
    argv = qemu.command_line(_vm(xen=True), TCG)
    assert argv[argv.index("-cpu") + 1] == "qemu64,+svm"


def test_uefi_pxe_vm_has_no_option_rom_and_its_own_vars():
    vm = _vm(firmware=qemu.Firmware.UEFI_PXE, vars_file=Path("/f/vars.fd"))
    argv = qemu.command_line(vm, TCG)
    assert argv[argv.index("-machine") + 1] == "q35"
    assert any(a.endswith(",romfile=") for a in argv)
    assert "if=pflash,format=raw,unit=1,file=/f/vars.fd" in argv


def test_uefi_http_vm_has_no_option_rom_and_no_ipv6_pxe():
    vm = _vm(firmware=qemu.Firmware.UEFI_HTTP, vars_file=Path("/f/vars.fd"))
    argv = qemu.command_line(vm, TCG)
    assert any(a.endswith(",romfile=") for a in argv)
    assert argv[argv.index("-fw_cfg") + 1] == "name=opt/org.tianocore/IPv6PXESupport,string=n"
    assert "-fw_cfg" not in qemu.command_line(
        _vm(firmware=qemu.Firmware.UEFI_PXE, vars_file=Path("/f/vars.fd")), TCG)


def test_uefi_without_vars_copy_is_refused():
    with pytest.raises(FarmError):
        qemu.command_line(_vm(firmware=qemu.Firmware.UEFI), TCG)


def test_storage_disks_are_virtio_with_serials():
    argv = qemu.command_line(_vm(disks=(Path("/f/d0.qcow2"), Path("/f/d1.qcow2"))), TCG)
    assert "virtio-blk-pci,drive=disk1,serial=farm-disk1" in argv


def test_default_plan_is_one_dom0_and_one_storage_node():
    nodes = plan_nodes(1, 1, "bios", "198.18.0.0/24")
    assert [(n.role, n.mac, n.ip, n.memory_mb, n.disks) for n in nodes] == [
        ("dom0", "52:54:00:fa:d0:01", "198.18.0.10", 2560, 0),
        ("storage", "52:54:00:fa:5a:01", "198.18.0.50", 1536, 2)]


def test_a_nodes_address_does_not_depend_on_the_farms_shape():
    # A registry kept from a 2+2 farm must not hold the default farm's addresses for other
    # MACs (seen: "address 198.18.0.11 is already reserved for 52:54:00:fa:d0:02").
    layouts = [plan_nodes(d, s, "bios", "198.18.0.0/24") for d, s in ((1, 1), (2, 2), (0, 3))]
    owner: dict[str, str] = {}
    for nodes in layouts:
        for node in nodes:
            assert owner.setdefault(node.ip, node.mac) == node.mac, (node, owner)
    with pytest.raises(FarmError):
        plan_nodes(41, 0, "bios", "198.18.0.0/24")


def test_firmware_list_is_cycled_over_nodes():
    nodes = plan_nodes(1, 2, ["bios", "uefi"], "198.18.0.0/24")
    assert [n.firmware for n in nodes] == ["bios", "uefi", "bios"]


def test_farm_network_must_stay_in_the_benchmark_range():
    with pytest.raises(FarmError):
        NetworkPlan("x", "10.0.0.0/24")
    assert NetworkPlan("x", "198.19.4.0/24").server_ip == "198.19.4.1"


def test_table_lists_every_node():
    rows = [{"name": "dom0-1", "mac": "52:54:00:fa:d0:01", "role": "dom0", "ip": "198.18.0.10",
             "state": "ready", "firmware": "bios", "vm": "running", "ready_seconds": 201.6}]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:3] == ["NODE", "MAC", "ROLE"]
    assert lines[1].split() == ["dom0-1", "52:54:00:fa:d0:01", "dom0", "198.18.0.10", "ready",
                                "bios", "running", "201.6s"]


def test_authorized_keys_join_every_public_key_line():
    from configserver.farm.farm import authorized_keys
    own = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB farm@x\n"
    user = "# mine\nssh-rsa AAAAB3NzaC1yc2E user@host\n\necdsa-sha2-nistp256 AAAAE2 other\n"
    assert authorized_keys([own, user]).splitlines() == [
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB farm@x", "ssh-rsa AAAAB3NzaC1yc2E user@host",
        "ecdsa-sha2-nistp256 AAAAE2 other"]


@pytest.mark.parametrize("keys", [[], ["-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n"], ["\n"]])
def test_authorized_keys_refuse_what_is_not_a_public_key(keys):
    from configserver.farm.farm import authorized_keys
    with pytest.raises(FarmError):
        authorized_keys(keys)


def test_only_stages_of_this_power_on_count():
    from configserver.farm.farm import this_boot
    timeline = [{"stage": "ready", "time": 100.0}, {"stage": "dhcp", "time": 500.2},
                {"stage": "ready", "time": 620.0}]
    assert this_boot(timeline, power_on=500.0) == timeline[1:]
    assert this_boot(timeline, power_on=700.0) == []
