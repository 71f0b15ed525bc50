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
    """The test image's marker line, without a kernel message the console wrote into it
    (``... nbtest=uefi[    2.166239] tsc: ...``: printk does not wait for the line's end)."""
    line = serial.wait_for(r"NETBOOT-TEST-OK[^\r\n]*", BOOT_TIMEOUT, proc=proc).group(0)
    return re.split(r"\[\s*\d+\.\d+\]", line, maxsplit=1)[0]


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


def test_uefi_xen_boots_through_xen_efi_and_ipxe_files(boot_lab, test_image):
    # OVMF with the iPXE ROM's EFI driver: iPXE's EFI build cannot multiboot, so the script
    # fetches xen.efi, its xen.cfg, the kernel and the initramfs, and xen.efi reads them from
    # iPXE's virtual file system.
    boot_lab.start_server(test_image.directory.parent, "--dhcp", "full", "--tftp", "on")
    _add_role(boot_lab, "nbxen", "xen", "console=hvc0 earlyprintk=xen nbtest=xenefi",
              "console=com1 com1=115200,8n1 dom0_mem=512M,max:512M dom0_max_vcpus=1")
    boot_lab.cli("node", "add", MAC, "--role", "nbxen", "--ip", NODE_IP)

    proc, serial = boot_lab.boot_vm("xen-uefi", MAC, firmware=qemu.Firmware.UEFI,
                                    memory_mb=1536, xen=True)
    serial.wait_for(r"Using configuration file 'xen\.cfg'", BOOT_TIMEOUT, proc=proc)
    serial.wait_for(r"\(XEN\) Bootloader: EFI", BOOT_TIMEOUT, proc=proc)
    line = _marker(serial, proc)

    assert "hypervisor=xen" in line
    assert "nbtest=xenefi" in line.split()
    assert f"netboot.mac={MAC}" in line.split()
    events = boot_lab.node(MAC)["events"]
    files = [e["detail"].get("file") for e in events if e["stage"] == "http.hypervisor"]
    assert files == ["xen.efi"], events
    formats = [e["detail"].get("format") for e in events if e["stage"] == "http.script"]
    assert formats == ["ipxe", "xen-efi"], events
    stages = [e["stage"] for e in events]
    assert {"http.kernel", "http.initramfs"} <= set(stages), stages


def test_uefi_http_boot_without_tftp_falls_through_pxe_to_http(boot_lab, test_image):
    # No TFTP server and no option ROM: OVMF's PXE gets an address but no boot file from our
    # DHCP, gives up, and its HTTP Boot (vendor class HTTPClient) is answered with the URL of
    # ipxe.efi; iPXE then boots the test image over HTTP as usual.
    boot_lab.start_server(test_image.directory.parent, "--dhcp", "full", "--tftp", "off")
    _add_role(boot_lab, "nbtest", "linux", "console=ttyS0,115200 nbtest=httpboot")
    boot_lab.cli("node", "add", MAC, "--role", "nbtest", "--ip", NODE_IP)

    proc, serial = boot_lab.boot_vm("uefi-http", MAC, firmware=qemu.Firmware.UEFI_HTTP,
                                    memory_mb=1024)
    serial.wait_for(r"PXE-E16: No valid offer received", BOOT_TIMEOUT, proc=proc)
    serial.wait_for(r"URI: http://198\.18\.0\.1:8080/ipxe/ipxe\.efi", BOOT_TIMEOUT, proc=proc)
    line = _marker(serial, proc)

    assert "nbtest=httpboot" in line.split()
    view = boot_lab.node(MAC)
    events = view["events"]
    stages = [e["stage"] for e in events]
    assert not [s for s in stages if s.startswith("tftp.")], stages
    assert "tftp" not in [step["stage"] for step in view["timeline"]], view["timeline"]
    pxe = [e for e in events if e["stage"] == "dhcp.discover"
           and e["detail"].get("stage") == "pxe"]
    http = [i for i, e in enumerate(events) if e["stage"] == "dhcp.discover"
            and e["detail"].get("stage") == "http" and e["detail"].get("arch") == 16]
    assert pxe and http, events
    assert events.index(pxe[-1]) < http[0], "HTTP Boot came before the PXE attempt"
    ipxe = [e for e in events if e["stage"] == "http.ipxe"]
    assert [e["detail"]["file"] for e in ipxe] == ["ipxe.efi"], ipxe
    assert stages.index("http.ipxe") < stages.index("http.script") < stages.index("http.kernel")
