"""HTTP boot: per-node iPXE scripts, GRUB and xen.efi configs, iPXE binaries and image files.

Every answer is decided by the registry (what the MAC is) and the image catalog (what the role's
image ships); no path of the caller's choosing reaches the filesystem. Each fetch of a script or
an image file is recorded in the node's boot timeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from configserver.errors import InvalidMac, NotFound
from configserver.http.appkeys import API_BASE, AUTHORITY, CATALOG, CONFIG, REGISTRY, SECRET_KEY
from configserver.http.tickets import issue_ticket
from configserver.model import NodeState, Role, UnknownMacPolicy, normalize_mac
from configserver.registry import Registry
from configserver.render import (
    BootPlan,
    BootServer,
    ScriptFormat,
    ScriptRenderer,
    boot_plan,
    exit_plan,
    waiting_plan,
)

log = logging.getLogger(__name__)



class MacResolver:
    """Which MAC a client address belongs to: its DHCP lease, else its reservation.

    Created with the application; the DHCP service, started later, plugs its lease lookup in.
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self.leases: Callable[[str], str | None] | None = None

    def __call__(self, ip: str) -> str | None:
        if self.leases is not None:
            return self.leases(ip)  # it falls back to the reservations itself
        node = self._registry.lookup_ip(ip)
        return node.mac if node else None


RENDERER = web.AppKey("renderer", ScriptRenderer)
RESOLVE_MAC = web.AppKey("resolve_mac", MacResolver)
IPXE_DIR = web.AppKey("ipxe_dir", Path)

_IPXE_BINARY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.(efi|kpxe|kkpxe|pxe|lkrn)$")
# Image attribute -> the boot stage a fetch of that file records.
_FILE_STAGES = (("kernel", "kernel"), ("initramfs", "initramfs"), ("hypervisor", "hypervisor"),
                ("hypervisor_efi", "hypervisor"))
# What a pending node boots when the server has a discovery image (ServerConfig).
DISCOVERY_ROLE = "discovery"
DISCOVERY_KERNEL_ARGS = "console=tty0 console=ttyS0,115200"

DEFAULT_IPXE_DIRS = (Path("/usr/lib/ipxe"), Path("/usr/share/ipxe"))


def find_ipxe_dir(configured: Path | None) -> Path:
    """Where Debian's ipxe package put its binaries (or the configured directory)."""
    if configured is not None:
        return configured
    for candidate in DEFAULT_IPXE_DIRS:
        if (candidate / "undionly.kpxe").exists() or (candidate / "ipxe.efi").exists():
            return candidate
    return DEFAULT_IPXE_DIRS[0]


def setup_routes(app: web.Application) -> None:
    app[RENDERER] = ScriptRenderer()
    app[RESOLVE_MAC] = MacResolver(app[REGISTRY])
    app[IPXE_DIR] = find_ipxe_dir(app[CONFIG].ipxe_dir)
    app.router.add_get("/boot/{mac}.ipxe", ipxe_script)
    app.router.add_get("/boot/{mac}/grub.cfg", grub_config)
    app.router.add_get("/boot/{mac}/xen.cfg", xen_efi_config)
    app.router.add_get("/boot/ssh-keys", ssh_keys)
    app.router.add_get("/boot/agent.json", agent_trust)
    app.router.add_get("/ipxe/{name}", ipxe_binary)
    app.router.add_get("/images/{image}/{name}", image_file)


def _server(request: web.Request) -> BootServer:
    # With an HTTPS API, the command line pins its CA (the agent then reads /boot/agent.json).
    pinned = request.app[AUTHORITY].fingerprint if request.app.get(API_BASE) else ""
    public = request.app[CONFIG].http.public_url
    if public:
        return BootServer(public.rstrip("/"), ca_fingerprint=pinned)
    return BootServer(f"http://{_host_with_port(request)}", ca_fingerprint=pinned)


def _host_with_port(request: web.Request) -> str:
    """The Host header, with the port the request came in on if it names none: GRUB's HTTP
    client sends ``Host: 198.18.0.1`` even from port 8080, and the URLs rendered for it must
    not fall back to port 80."""
    host = request.host
    if ":" in host.rsplit("]", 1)[-1]:
        return host
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    port = sockname[1] if isinstance(sockname, tuple) and len(sockname) >= 2 else None
    return host if port in (None, 80) else f"{host}:{port}"


def _client_mac(request: web.Request) -> str | None:
    """The MAC a fetch is on behalf of, for its timeline: the ``mac`` query our scripts add,
    else the client address's lease or reservation. Only used to record events, which the
    registry keeps for known nodes only."""
    text = request.query.get("mac")
    if text:
        try:
            return normalize_mac(text)
        except InvalidMac:
            return None
    if request.remote:
        return request.app[RESOLVE_MAC](request.remote)
    return None


async def ipxe_script(request: web.Request) -> web.Response:
    return _script(request, ScriptFormat.IPXE)


async def grub_config(request: web.Request) -> web.Response:
    return _script(request, ScriptFormat.GRUB)


async def xen_efi_config(request: web.Request) -> web.Response:
    """The xen.cfg that a UEFI machine's iPXE fetches, next to xen.efi, for a Xen boot."""
    return _script(request, ScriptFormat.XEN_EFI)


def _script(request: web.Request, fmt: ScriptFormat) -> web.Response:
    app = request.app
    config, registry = app[CONFIG], app[REGISTRY]
    mac = normalize_mac(request.match_info["mac"])
    server = _server(request)
    node = registry.lookup(mac)
    if node is None:
        if registry.unknown_mac_policy() != UnknownMacPolicy.DISCOVER:
            log.info("%s: unknown MAC asked for its boot script; sent back to firmware", mac)
            plan = exit_plan(mac, server, f"{mac} is not registered here", fmt=fmt)
            return _render(app, plan, fmt)
        node = registry.discover(mac, {"via": "http", "client": request.remote,
                                       **_client_facts(request)})
        log.info("%s: discovered, recorded as pending", mac)
    role: Role | None = None
    if node.state == NodeState.PENDING or node.role is None:
        if config.discovery_image:
            role = Role(DISCOVERY_ROLE, image=config.discovery_image,
                        kernel_args=DISCOVERY_KERNEL_ARGS)
        else:
            plan = waiting_plan(mac, server, f"{mac} is waiting to be registered "
                                f"(configserver node add {mac} --role ROLE)", fmt=fmt)
            registry.record_event(node.mac, "http.script", {"format": fmt.value,
                                                            "result": "pending"})
            return _render(app, plan, fmt)
    else:
        role = registry.role(node.role)
    if role is None:  # the registry refuses unknown roles, so this is a removed role
        plan = waiting_plan(mac, server, f"role {node.role!r} does not exist", fmt=fmt)
    else:
        image = app[CATALOG].get(role.image)
        # The ticket links this script to the agent it starts (tickets.py); issuing one
        # stores nothing and moves no state.
        ticket = issue_ticket(app[SECRET_KEY], node.mac, time.time())
        plan = boot_plan(node, role, image, server, mac=mac, fmt=fmt, ticket=ticket)
    if plan.kind == "wait":
        log.warning("%s: cannot boot: %s", mac, plan.message)
    registry.record_event(node.mac, "http.script",
                          {"format": fmt.value, "result": plan.kind,
                           "client": request.remote, **({"message": plan.message}
                                                        if plan.message else {})})
    return _render(app, plan, fmt)


def _render(app: web.Application, plan: BootPlan, fmt: ScriptFormat) -> web.Response:
    if fmt == ScriptFormat.XEN_EFI and plan.kind != "xen":
        # Only a Xen boot script asks for xen.cfg: iPXE's "|| goto failed" asks again.
        raise NotFound(f"{plan.mac} boots no Xen now ({plan.kind}): no xen.cfg")
    return _text(app[RENDERER].render(plan, fmt))


def _client_facts(request: web.Request) -> dict[str, str]:
    facts = {}
    for key in ("arch", "platform", "manufacturer", "product", "serial", "uuid"):
        value = request.query.get(key)
        if value:
            facts[key] = value[:128]
    return facts


def _text(body: str) -> web.Response:
    return web.Response(text=body, content_type="text/plain",
                        headers={"Cache-Control": "no-store"})


def public_keys(text: str) -> str:
    """The public-key lines of an ``authorized_keys`` text; comments, blanks and anything
    else (a private key pasted by mistake) are left out."""
    lines = (line.strip() for line in text.splitlines())
    return "".join(f"{line}\n" for line in lines
                   if line.startswith(("ssh-", "ecdsa-", "sk-")) and len(line.split()) >= 2)


async def ssh_keys(request: web.Request) -> web.Response:
    """Root's SSH keys for every node (netboot-base's ``netboot-ssh-keys.service`` adds them):
    public keys, so plain HTTP like the rest of the boot files. An instance (``?mac=`` one
    of its NICs) gets the keys it was created with instead, never the operator's."""
    text = request.query.get("mac")
    mac = None
    if text:
        with contextlib.suppress(InvalidMac):
            mac = normalize_mac(text)
    found = await asyncio.to_thread(request.app[REGISTRY].instance_nic, mac) if mac else None
    if found is not None:
        return _text("".join(f"{key}\n" for key in found[0].ssh_keys))
    path = request.app[CONFIG].ssh_keys
    if path is None:
        raise NotFound("this server hands out no SSH keys",
                       hint="configserver serve --ssh-keys FILE")
    try:
        text = await asyncio.to_thread(path.read_text)
    except OSError as exc:
        raise NotFound(f"SSH keys file {path}: {exc.strerror}") from None
    mac = _client_mac(request)
    if mac:
        request.app[REGISTRY].record_event(mac, "http.ssh_keys", {"client": request.remote})
    return _text(public_keys(text))


async def agent_trust(request: web.Request) -> web.Response:
    """Where agents find the API, and the CA its certificate chains to: public, over plain
    HTTP like every boot file. An agent trusts the CA only if it is the one its kernel
    command line pins (``netboot.ca=``), so a forged answer gets it nowhere."""
    api_base = request.app.get(API_BASE)
    if not api_base:
        raise NotFound("this server has no HTTPS API for agents")
    return web.json_response({"api_url": api_base,
                              "ca_pem": request.app[AUTHORITY].certificate_pem.decode()},
                             headers={"Cache-Control": "no-store"})


async def ipxe_binary(request: web.Request) -> web.StreamResponse:
    """iPXE binaries for UEFI HTTP Boot clients, from the located iPXE directory only."""
    name = request.match_info["name"]
    if not _IPXE_BINARY.match(name):
        raise NotFound(f"no iPXE binary {name!r}")
    path = request.app[IPXE_DIR] / name
    if not path.is_file():
        raise NotFound(f"no iPXE binary {name!r} in {request.app[IPXE_DIR]}")
    # UEFI HTTP Boot asks for the size first (HEAD): only the download is an event.
    mac = _client_mac(request) if request.method != "HEAD" else None
    if mac:
        request.app[REGISTRY].record_event(mac, "http.ipxe", {"file": name})
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


async def image_file(request: web.Request) -> web.StreamResponse:
    """A file that a known image ships (sendfile, Range requests); nothing else."""
    name, filename = request.match_info["image"], request.match_info["name"]
    image = request.app[CATALOG].get(name)
    path = image.path(filename) if image else None
    if image is None or path is None:
        raise NotFound(f"image {name!r} has no file {filename!r}")
    if not path.is_file():
        raise NotFound(f"image {name!r} lists {filename!r} but it is missing on disk")
    stage = next((s for a, s in _FILE_STAGES if getattr(image, a) == filename), "file")
    mac = _client_mac(request)
    if mac:
        detail = {"image": name, "file": filename, "client": request.remote}
        if request.http_range.start is not None:
            detail["range"] = request.headers.get("Range", "")
        request.app[REGISTRY].record_event(mac, f"http.{stage}", detail)
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
