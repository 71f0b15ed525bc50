"""Golden-output tests of every boot template (regenerate: UPDATE_GOLDEN=1 pytest ...)."""

import os
from pathlib import Path

import jinja2
import pytest

from configserver.images import Image
from configserver.model import BUILTIN_ROLES, Nic, Node
from configserver.render import (
    MULTIBOOT_CMDLINE_MAX,
    BootPlan,
    BootServer,
    ScriptFormat,
    ScriptRenderer,
    boot_plan,
    exit_plan,
    grub_path,
    multiboot_bytes,
    waiting_plan,
)

GOLDEN = Path(__file__).parent / "golden"
PLAIN = BootServer("http://198.18.0.1:8080")
SERVER = BootServer("http://198.18.0.1:8080", ca_fingerprint="sha256:" + "A" * 43)
TICKET = "18c5f2b3a10.kGx3x_ZsLw0tVVaQ"
ROLES = {r.name: r for r in BUILTIN_ROLES}
MAC = "52:54:00:aa:bb:01"
NODE = Node(mac=MAC, role="storage", hostname="sn1", nics=(Nic(MAC, "198.18.0.21"),),
            kernel_args="quiet")
DOM0 = Node(mac=MAC, role="dom0", hostname="hv1", nics=(Nic(MAC, "198.18.0.11"),))
STORAGE_IMAGE = Image("storage", Path("/x/storage"), "vmlinuz", "initramfs.img",
                      files=frozenset({"vmlinuz", "initramfs.img"}))
DOM0_IMAGE = Image("dom0", Path("/x/dom0"), "vmlinuz", "initramfs.img", "xen",
                   frozenset({"vmlinuz", "initramfs.img", "xen"}))
DOM0_EFI_IMAGE = Image("dom0", Path("/x/dom0"), "vmlinuz", "initramfs.img", "xen",
                       frozenset({"vmlinuz", "initramfs.img", "xen", "xen.efi"}),
                       hypervisor_efi="xen.efi")

CASES = {
    "storage.ipxe": (boot_plan(NODE, ROLES["storage"], STORAGE_IMAGE, SERVER, mac=MAC,
                               ticket=TICKET), ScriptFormat.IPXE),
    "storage-plain.ipxe": (boot_plan(NODE, ROLES["storage"], STORAGE_IMAGE, PLAIN, mac=MAC),
                           ScriptFormat.IPXE),
    "dom0.ipxe": (boot_plan(DOM0, ROLES["dom0"], DOM0_IMAGE, SERVER, mac=MAC,
                            ticket=TICKET), ScriptFormat.IPXE),
    "dom0-efi.ipxe": (boot_plan(DOM0, ROLES["dom0"], DOM0_EFI_IMAGE, SERVER, mac=MAC),
                      ScriptFormat.IPXE),
    "dom0.xen.cfg": (boot_plan(DOM0, ROLES["dom0"], DOM0_EFI_IMAGE, SERVER, mac=MAC,
                               fmt=ScriptFormat.XEN_EFI), ScriptFormat.XEN_EFI),
    "storage.grub.cfg": (boot_plan(NODE, ROLES["storage"], STORAGE_IMAGE, SERVER, mac=MAC,
                                   fmt=ScriptFormat.GRUB), ScriptFormat.GRUB),
    "dom0.grub.cfg": (boot_plan(DOM0, ROLES["dom0"], DOM0_IMAGE, SERVER, mac=MAC,
                                fmt=ScriptFormat.GRUB), ScriptFormat.GRUB),
    "missing-image.ipxe": (boot_plan(NODE, ROLES["storage"], None, SERVER, mac=MAC),
                           ScriptFormat.IPXE),
    "pending.ipxe": (waiting_plan(MAC, SERVER, f"{MAC} is waiting to be registered"),
                     ScriptFormat.IPXE),
    "pending.grub.cfg": (waiting_plan(MAC, SERVER, "waiting", fmt=ScriptFormat.GRUB),
                         ScriptFormat.GRUB),
    "unknown.ipxe": (exit_plan(MAC, SERVER, f"{MAC} is not registered here"),
                     ScriptFormat.IPXE),
    "unknown.grub.cfg": (exit_plan(MAC, SERVER, "not registered", fmt=ScriptFormat.GRUB),
                         ScriptFormat.GRUB),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_template_output_matches_golden_file(name):
    plan, fmt = CASES[name]
    text = ScriptRenderer().render(plan, fmt)
    golden = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
        pytest.skip("golden file rewritten")
    assert text == golden.read_text()


def test_every_template_has_a_golden_case():
    templates = sorted(p.relative_to(p.parents[1]).as_posix() for p in
                       (Path(__file__).parents[2] / "configserver/templates").rglob("*.j2"))
    assert templates, "no templates found"
    kinds = {(fmt.value, plan.kind) for plan, fmt in CASES.values()}
    for template in templates:
        folder, base = template.split("/")
        assert (folder, base.split(".")[0]) in kinds, template


def test_xen_role_with_image_lacking_hypervisor_waits():
    plan = boot_plan(DOM0, ROLES["dom0"], STORAGE_IMAGE, SERVER, mac=MAC)
    assert plan.kind == "wait"
    assert "no Xen hypervisor" in plan.message


def test_uefi_xen_boot_names_the_same_files_in_script_and_xen_cfg():
    plan = boot_plan(DOM0, ROLES["dom0"], DOM0_EFI_IMAGE, SERVER, mac=MAC)
    script = ScriptRenderer().render(plan)
    efi_part = script.split(":efi\n", 1)[1].split(":failed", 1)[0]
    names = [line.split()[2] for line in efi_part.splitlines()
             if line.startswith(("kernel --name", "initrd --name"))]
    assert names == ["xen.efi", "xen.cfg", "vmlinuz", "initramfs.img"]
    assert f"{SERVER.base_url}/boot/{MAC}/xen.cfg" in efi_part
    assert f"{SERVER.base_url}/images/dom0/xen.efi " in efi_part
    config = ScriptRenderer().render(plan, ScriptFormat.XEN_EFI)
    assert f"kernel=vmlinuz {plan.kernel_cmdline}\n" in config
    assert "ramdisk=initramfs.img\n" in config
    assert f"options={plan.hypervisor_cmdline}\n" in config


def test_image_without_xen_efi_tells_a_uefi_machine_so():
    plan = boot_plan(DOM0, ROLES["dom0"], DOM0_IMAGE, SERVER, mac=MAC)
    assert plan.hypervisor_efi_url == "" and plan.xen_efi_config_url == ""
    efi_part = ScriptRenderer().render(plan).split(":efi\n", 1)[1].split(":failed", 1)[0]
    assert "ships no xen.efi" in efi_part
    assert not [line for line in efi_part.splitlines() if line.startswith(("kernel", "boot"))]


def test_kernel_command_line_carries_what_the_agent_needs():
    plan = boot_plan(NODE, ROLES["storage"], STORAGE_IMAGE, SERVER, mac=MAC)
    args = plan.kernel_cmdline.split()
    assert args[:5] == ["netboot.server=http://198.18.0.1:8080", "netboot.ca=" + "A" * 43,
                        f"netboot.mac={MAC}", "netboot.role=storage", "netboot.hostname=sn1"]
    assert not [a for a in args if a.startswith("BOOTIF=")]  # netboot.mac says it
    with_ticket = boot_plan(NODE, ROLES["storage"], STORAGE_IMAGE, SERVER, mac=MAC,
                            ticket=TICKET).kernel_cmdline.split()
    assert with_ticket[4] == f"netboot.ticket={TICKET}"
    assert args[-1] == "quiet"  # node arguments come last so they win


def test_missing_variable_is_an_error_not_an_empty_string():
    env = ScriptRenderer()._env
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("{{ plan.nosuch }}").render(plan=BootPlan("linux", "t", MAC, "u"))


def test_grub_path():
    assert grub_path("http://198.18.0.1:8080/images/a/vmlinuz") == \
        "(http,198.18.0.1:8080)/images/a/vmlinuz"


def test_a_xen_boot_fits_ipxes_multiboot_command_line_buffer_or_says_why_not():
    plan = boot_plan(DOM0, ROLES["dom0"], DOM0_IMAGE, SERVER, mac=MAC, ticket=TICKET)
    assert plan.kind == "xen"
    used = multiboot_bytes(plan)
    # As iPXE lays them out: "URL args\0" for Xen and the kernel, "URL\0" for the initramfs.
    script = ScriptRenderer().render(plan)
    lines = [line.split(" || ")[0].split(" ", 1)[1] for line in script.splitlines()
             if line.startswith(("kernel http", "module http"))]
    assert used == sum(len(line) + 1 for line in lines) <= MULTIBOOT_CMDLINE_MAX
    long_args = Node(mac=MAC, role="dom0", hostname="hv1", nics=(Nic(MAC),),
                     kernel_args="x" * (513 - used))
    refused = boot_plan(long_args, ROLES["dom0"], DOM0_IMAGE, SERVER, mac=MAC, ticket=TICKET)
    assert refused.kind == "wait"
    assert f"need {used + 513 - used + 1} bytes" in refused.message
    assert "at most 512" in refused.message
