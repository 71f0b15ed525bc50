"""Boot scripts as a pure function of (node, role, image, server): no I/O, no registry access.

``boot_plan`` works out what a machine should boot (URLs, kernel command line); the jinja2
templates only lay the plan out as an iPXE script, a GRUB configuration or, for a Xen boot on
UEFI, the ``xen.cfg`` of Xen's EFI loader. Templates use ``StrictUndefined``, so a missing
variable is an error and never an empty string.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import jinja2

from configserver.images import Image
from configserver.model import BootTemplate, Node, Role

# iPXE (src/arch/x86/image/multiboot.c, MB_MAX_CMDLINE) keeps the command lines of a multiboot
# kernel and its modules, each after its URL, in one 512-byte buffer and cuts what is beyond.
MULTIBOOT_CMDLINE_MAX = 512


class ScriptFormat(enum.StrEnum):
    IPXE = "ipxe"
    GRUB = "grub"
    XEN_EFI = "xen-efi"  # xen.cfg for xen.efi; only a "xen" plan has one


@dataclass(frozen=True)
class BootServer:
    """How nodes reach this server, as seen by the client that asked."""

    base_url: str  # e.g. http://198.18.0.1:8080 (no trailing slash)
    # The fingerprint of the CA that signs the API's certificate ("" without TLS).
    ca_fingerprint: str = ""

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"


@dataclass(frozen=True)
class BootPlan:
    """Everything a boot script needs; templates read nothing else."""

    kind: str  # "linux", "xen", "wait" or "exit"
    title: str
    mac: str
    script_url: str
    kernel_url: str = ""
    initramfs_url: str = ""
    initramfs_name: str = ""
    hypervisor_url: str = ""
    hypervisor_efi_url: str = ""  # xen.efi, for UEFI machines ("" if the image has none)
    xen_efi_config_url: str = ""  # the xen.cfg that xen.efi reads
    kernel_name: str = ""
    kernel_cmdline: str = ""
    hypervisor_cmdline: str = ""
    message: str = ""
    retry_seconds: int = 30


def kernel_cmdline(node: Node, role: Role, server: BootServer, mac: str,
                   ticket: str = "") -> str:
    """The Linux command line: what the agent needs to find itself, then role and node args."""
    parts = [f"netboot.server={server.base_url}"]
    if server.ca_fingerprint:
        # The agent learns the API's URL from the boot server and trusts it only through
        # the CA this pins (the value after "sha256:", to keep the line short).
        parts.append(f"netboot.ca={server.ca_fingerprint.removeprefix('sha256:')}")
    parts += [
        f"netboot.mac={mac}",
        f"netboot.role={role.name}",
    ]
    if ticket:
        parts.append(f"netboot.ticket={ticket}")
    if node.hostname:
        parts.append(f"netboot.hostname={node.hostname}")
    parts.extend(a for a in (role.kernel_args, node.kernel_args) if a)
    return " ".join(parts)


def boot_plan(node: Node, role: Role, image: Image | None, server: BootServer, *,
              mac: str, fmt: ScriptFormat = ScriptFormat.IPXE, ticket: str = "") -> BootPlan:
    """What ``node`` (asking through NIC ``mac``) boots; a ``wait`` plan if it cannot yet.

    ``ticket`` is this boot's ticket (``configserver.http.tickets``), passed to the agent.
    """
    script_url = _script_url(server, mac, fmt)
    title = f"{node.hostname or mac} ({role.name})"
    if image is None:
        return BootPlan(kind="wait", title=title, mac=mac, script_url=script_url,
                        message=f"image {role.image!r} of role {role.name} is not built yet")
    if role.template == BootTemplate.XEN and not image.hypervisor:
        return BootPlan(kind="wait", title=title, mac=mac, script_url=script_url,
                        message=f"image {image.name!r} has no Xen hypervisor for role "
                                f"{role.name}")

    xen = role.template == BootTemplate.XEN

    def file_url(name: str) -> str:
        # Tagged with the MAC so that each fetch lands in this node's timeline; not for Xen,
        # whose URLs count against iPXE's 512 bytes of multiboot command lines (the server
        # then knows the node by its address).
        url = server.url(f"images/{image.name}/{name}")
        return url if xen else f"{url}?mac={mac}"

    plan = BootPlan(
        kind="xen" if xen else "linux",
        title=title, mac=mac, script_url=script_url,
        kernel_url=file_url(image.kernel),
        initramfs_url=file_url(image.initramfs),
        initramfs_name=image.initramfs,
        hypervisor_url=file_url(image.hypervisor) if image.hypervisor else "",
        hypervisor_efi_url=file_url(image.hypervisor_efi) if image.hypervisor_efi else "",
        xen_efi_config_url=(_script_url(server, mac, ScriptFormat.XEN_EFI)
                            if image.hypervisor_efi else ""),
        kernel_name=image.kernel,
        kernel_cmdline=kernel_cmdline(node, role, server, mac, ticket),
        hypervisor_cmdline=role.hypervisor_args,
    )
    needed = multiboot_bytes(plan) if xen else 0
    if needed > MULTIBOOT_CMDLINE_MAX:
        return BootPlan(kind="wait", title=title, mac=mac, script_url=script_url,
                        message=f"Xen's command lines need {needed} bytes, iPXE passes at most "
                                f"{MULTIBOOT_CMDLINE_MAX} to a multiboot kernel: shorten the "
                                f"kernel or hypervisor arguments of role {role.name} or node "
                                f"{node.hostname or mac}")
    return plan


def multiboot_bytes(plan: BootPlan) -> int:
    """What iPXE's BIOS multiboot loader copies for a Xen plan: each image's URL, a space and
    its command line, NUL-terminated, for Xen, the kernel and the initramfs together."""
    lines = ((plan.hypervisor_url, plan.hypervisor_cmdline), (plan.kernel_url,
                                                              plan.kernel_cmdline),
             (plan.initramfs_url, ""))
    return sum(len(url) + (len(args) + 1 if args else 0) + 1 for url, args in lines)


def waiting_plan(mac: str, server: BootServer, message: str, *,
                 fmt: ScriptFormat = ScriptFormat.IPXE, retry_seconds: int = 30) -> BootPlan:
    """A machine the registry does not (yet) let boot: say why and ask again later."""
    return BootPlan(kind="wait", title=mac, mac=mac, script_url=_script_url(server, mac, fmt),
                    message=message, retry_seconds=retry_seconds)


def exit_plan(mac: str, server: BootServer, message: str, *,
              fmt: ScriptFormat = ScriptFormat.IPXE) -> BootPlan:
    """Hand the machine back to its firmware's next boot device."""
    return BootPlan(kind="exit", title=mac, mac=mac, script_url=_script_url(server, mac, fmt),
                    message=message)


def _script_url(server: BootServer, mac: str, fmt: ScriptFormat) -> str:
    if fmt == ScriptFormat.GRUB:
        return server.url(f"boot/{mac}/grub.cfg")
    if fmt == ScriptFormat.XEN_EFI:
        return server.url(f"boot/{mac}/xen.cfg")
    return server.url(f"boot/{mac}.ipxe")


def grub_path(url: str) -> str:
    """``http://host:port/a/b`` as GRUB names it: ``(http,host:port)/a/b``."""
    scheme, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    return f"({scheme},{host})/{path}"


class ScriptRenderer:
    """Renders boot plans with the packaged templates (loaded once, rendered many times)."""

    def __init__(self) -> None:
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader("configserver", "templates"),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._env.filters["grub_path"] = grub_path

    def render(self, plan: BootPlan, fmt: ScriptFormat = ScriptFormat.IPXE) -> str:
        suffix = "ipxe" if fmt == ScriptFormat.IPXE else "cfg"
        template = self._env.get_template(f"{fmt.value}/{plan.kind}.{suffix}.j2")
        return template.render(plan=plan)
