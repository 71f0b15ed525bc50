"""vm tier, issues 3 and 4: QEMU PXE-boots the small test image through our DHCP, TFTP, HTTP.

The test image (tests/vm/testimage.py) is a Debian kernel with a busybox /init that prints
``NETBOOT-TEST-OK hypervisor=<type> <cmdline>`` and powers off; each test waits for that line on
the serial console and checks the config server's boot events for the stages it served.
"""

from __future__ import annotations

import re

import pytest

from configserver.farm import qemu

pytestmark = pytest.mark.vm

MAC = "52:54:00:7e:57:01"
NODE_IP = "198.18.0.10"
BOOT_TIMEOUT = 240  # TCG: ~30 s for BIOS iPXE + kernel on an idle 2-core box


def _add_role(lab, name: str, template: str, kernel_args: str, hypervisor_args: str = ""):
    argv = ["role", "add", name, "--image", "testimage", "--template", template,
            "--kernel-args", kernel_args]
    if hypervisor_args:
        argv += ["--hypervisor-args", hypervisor_args]
    lab.cli(*argv)


def _marker(serial: qemu.SerialLog, proc) -> str:
    return serial.wait_for(r"NETBOOT-TEST-OK[^\r\n]*", BOOT_TIMEOUT, proc=proc).group(0)


def test_bios_ipxe_rom_boots_test_image_in_full_mode(boot_lab, test_image):
    boot_lab.start_server(test_image.directory.parent, "--dhcp", "full", "--tftp", "on")
    _add_role(boot_lab, "nbtest", "linux", "console=ttyS0,115200 nbtest=full")
    boot_lab.cli("node", "add", MAC, "--role", "nbtest", "--ip", NODE_IP)

    proc, serial = boot_lab.boot_vm("bios-full", MAC)
    line = _marker(serial, proc)

    assert "hypervisor=no" in line
    assert "nbtest=full" in line.split()
    stages = boot_lab.stages(MAC)
    for stage in ("dhcp.discover", "dhcp.ack", "http.script", "http.kernel", "http.initramfs"):
        assert stage in stages, f"{stage} missing from {stages}"
    acks = [e for e in boot_lab.node(MAC)["events"] if e["stage"] == "dhcp.ack"]
    assert any(NODE_IP in str(e.get("detail")) for e in acks), acks


def test_bios_ipxe_rom_boots_in_proxy_mode_beside_dnsmasq(boot_lab, test_image):
    # dnsmasq, in its own namespace on the same bridge, hands out addresses and no boot info;
    # our server, in proxy mode, gives the PXE/iPXE client its boot information.
    side = boot_lab.side_namespace("198.18.0.2")
    leases = boot_lab.workdir / "dnsmasq.leases"
    boot_lab.spawn(["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
                    "--interface=eth0", "--dhcp-range=198.18.0.100,198.18.0.150,255.255.255.0",
                    f"--dhcp-leasefile={leases}", "--log-dhcp"], "dnsmasq.log", netns=side)
    boot_lab.start_server(test_image.directory.parent, "--dhcp", "proxy", "--tftp", "on")
    _add_role(boot_lab, "nbtest", "linux", "console=ttyS0,115200 nbtest=proxy")
    boot_lab.cli("node", "add", MAC, "--role", "nbtest")

    proc, serial = boot_lab.boot_vm("bios-proxy", MAC)
    line = _marker(serial, proc)

    assert "nbtest=proxy" in line.split()
    lease_lines = leases.read_text().splitlines() if leases.exists() else []
    assert any(MAC in lease and re.search(r"198\.18\.0\.1[0-5]\d", lease)
               for lease in lease_lines), (lease_lines, boot_lab.log_tail("dnsmasq.log"))
    stages = boot_lab.stages(MAC)
    for stage in ("http.script", "http.kernel", "http.initramfs"):
        assert stage in stages, f"{stage} missing from {stages}"


def test_xen_multiboot_script_boots_hypervisor_and_dom0(boot_lab, test_image):
    boot_lab.start_server(test_image.directory.parent, "--dhcp", "full", "--tftp", "on")
    _add_role(boot_lab, "nbxen", "xen", "console=hvc0 earlyprintk=xen nbtest=xen",
              "console=com1 com1=115200,8n1 dom0_mem=512M,max:512M dom0_max_vcpus=1")
    boot_lab.cli("node", "add", MAC, "--role", "nbxen", "--ip", NODE_IP)

    proc, serial = boot_lab.boot_vm("xen", MAC, memory_mb=1536, xen=True)
    serial.wait_for(r"\(XEN\) Xen version", BOOT_TIMEOUT, proc=proc)
    line = _marker(serial, proc)

    assert "hypervisor=xen" in line
    assert "nbtest=xen" in line.split()
    stages = boot_lab.stages(MAC)
    assert {"http.hypervisor", "http.kernel", "http.initramfs"} <= set(stages), stages


def test_uefi_firmware_pxe_fetches_ipxe_efi_over_our_tftp(boot_lab, test_image):
    # No iPXE option ROM: OVMF's own PXE client gets ipxe.efi from our TFTP server, iPXE then
    # asks our DHCP again (user class iPXE) and fetches its script over HTTP.
    boot_lab.start_server(test_image.directory.parent, "--dhcp", "full", "--tftp", "on")
    _add_role(boot_lab, "nbtest", "linux", "console=ttyS0,115200 nbtest=uefi")
    boot_lab.cli("node", "add", MAC, "--role", "nbtest", "--ip", NODE_IP)

    proc, serial = boot_lab.boot_vm("uefi-pxe", MAC, firmware=qemu.Firmware.UEFI_PXE,
                                    memory_mb=1024)
    # A TFTP error makes OVMF fall back to UEFI HTTP boot: that must not pass for TFTP.
    serial = qemu.SerialLog(serial.path, (*qemu.FATAL_PATTERNS, r"PXE-E\d+: .*TFTP.*"))
    serial.wait_for(r"NBP filesize is [1-9]", BOOT_TIMEOUT, proc=proc)
    serial.wait_for(r"iPXE", BOOT_TIMEOUT, proc=proc)
    line = _marker(serial, proc)

    assert "nbtest=uefi" in line.split()
    events = boot_lab.node(MAC)["events"]
    tftp = [e for e in events if e["stage"].startswith("tftp.")]
    assert any("ipxe.efi" in str(e.get("detail")) or "snponly.efi" in str(e.get("detail"))
               for e in tftp), tftp
    stages = [e["stage"] for e in events]
    assert stages.index("http.script") > max(stages.index(e["stage"]) for e in tftp)
