"""The agents' side of the cloud: ``GET /api/v1/agent/work`` (a long poll of the node's
desired work) and ``POST /api/v1/agent/report`` (what the node has).

Both authenticate like a heartbeat (``agentapi``): the node's client certificate of its
current boot, or that boot's agent token, and the ``mac`` and ``boot_id`` they name must be
the session's. A long poll waits on the event loop (``GenerationNotifier``), holding no thread
and no database connection; the work itself is read and computed on a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import urllib.parse
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from configserver.cloud.guestwork import (
    GuestBoot,
    Peer,
    guest_network,
    guest_work,
    incoming_work,
)
from configserver.cloud.instances import holds
from configserver.cloud.migration import RELEASED
from configserver.cloud.work import ImageSource, node_work, portal
from configserver.errors import InvalidRequest
from configserver.http import limits
from configserver.http.agentapi import _authenticate, _json_body, _require_session, _session
from configserver.http.appkeys import CATALOG, CLOUD, CONFIG, REGISTRY, SECRET_KEY
from configserver.http.consoleapi import agent_api
from configserver.images import Image
from configserver.pki.identity import Identity
from configserver.registry import Registry

log = logging.getLogger(__name__)

MAX_REPORT_BYTES = 256 * 1024
DEFAULT_WAIT = 25.0
MAX_WAIT = 60.0


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/agent/work", work)
    app.router.add_post("/api/v1/agent/report", report,
                        expect_handler=limits.expect_handler(MAX_REPORT_BYTES,
                                                             _require_session))
    app.router.add_post("/api/v1/agent/claim", confirm_claim)


def _query_number(request: web.Request, name: str) -> float | None:
    text = request.query.get(name)
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequest(f"{name} must be a number") from None
    if math.isnan(value) or value < 0:
        raise InvalidRequest(f"{name} must be a number of at least 0")
    return value


def _http_base(request: web.Request) -> str:
    """The plain-HTTP URL nodes fetch images from."""
    config = request.app[CONFIG]
    if config.http.public_url:
        return config.http.public_url.rstrip("/")
    return f"http://{request.url.host}:{config.http.port}"


def file_sha256(image: Image | None, filename: str | None) -> str | None:
    """The sha256 the image's manifest gives one of its files (the agent checks it)."""
    if image is None or not filename:
        return None
    entry = (image.manifest.get("files") or {}).get(filename)
    digest = entry.get("sha256") if isinstance(entry, dict) else None
    return digest if isinstance(digest, str) else None


def rootfs_sha256(image: Image | None) -> str | None:
    """The sha256 the image's manifest gives its root file system."""
    return file_sha256(image, image.rootfs if image else None)


def _boots(request: web.Request, names: Iterable[str]) -> dict[str, GuestBoot]:
    """How a dom0 boots guests of each image: its kernel and initramfs over plain HTTP, with
    the manifest's sha256 of each and its kernel command line."""
    catalog, base, found = request.app[CATALOG], _http_base(request), {}
    for name in names:
        image = catalog.get(name)
        if image is None or image.path(image.kernel) is None:
            continue
        ramdisk = image.initramfs if image.path(image.initramfs) else None
        found[name] = GuestBoot(
            f"{base}/images/{name}/{image.kernel}", file_sha256(image, image.kernel),
            f"{base}/images/{name}/{ramdisk}" if ramdisk else "",
            file_sha256(image, ramdisk),
            str(image.manifest.get("kernel_args") or "root=/dev/xvda ro console=hvc0"))
    return found


def _images(request: web.Request, names: Iterable[str]) -> dict[str, ImageSource]:
    catalog, base, found = request.app[CATALOG], _http_base(request), {}
    for name in names:
        image = catalog.get(name)
        path = image.path(image.rootfs) if image and image.rootfs else None
        try:
            size = path.stat().st_size if path else None
        except OSError:
            size = None
        url = f"{base}/images/{name}/{image.rootfs}" if image and image.rootfs else None
        found[name] = ImageSource(name, url, size, rootfs_sha256(image))
    return found


def _peer(registry: Registry, mac: str) -> Peer:
    """How another dom0 reaches ``mac`` in a migration: its identity in its current boot,
    and the address its heartbeat came from with its agent's API port."""
    node = registry.lookup(mac)
    session = registry.agent_session(mac)
    where = agent_api(node) if node is not None else None
    return Peer(Identity("node", mac, boot_id=session.boot_id).uri() if session else None,
                where[0] if where else None, where[1] if where else None)


def _work(request: web.Request, mac: str, role: str | None) -> dict[str, Any]:
    """The node's work now (on a worker thread). The generation is read before the volumes,
    so the volumes are at least as new as it: a change in between only makes the agent
    ask again at once."""
    registry = request.app[REGISTRY]
    generation = registry.cloud_generation()
    volumes = registry.volumes()
    storage = {g.node for v in volumes for g in v.legs}
    portals, drained = {}, set()
    for node_mac in storage | {mac}:
        node = registry.lookup(node_mac)
        if node is not None and node.drained is not None:
            drained.add(node_mac)
        if node_mac in storage:
            portals[node_mac] = portal(next((n.ip for n in node.nics if n.ip), None)
                                       if node else None)
    images = _images(request, {v.image for v in volumes if v.image and v.leg(mac)})
    instances = registry.instances() if role == "dom0" else []
    coming = [i for i in instances if i.migration and i.migration.target == mac]
    answer = node_work(generation, role, mac, volumes, key=request.app[SECRET_KEY],
                       images=images, portals=portals, drained=drained,
                       standby={i.volume for i in coming if i.volume
                                and i.migration and i.migration.phase != RELEASED})
    if "dom0" in answer:
        held = [i for i in instances if i.claim and i.claim.node == mac]
        moving = {m for i in held + coming if i.migration
                  for m in (i.migration.source, i.migration.target)}
        by_id = {v.id: v for v in volumes}
        boots = _boots(request, {i.image for i in held + coming if i.image})
        peers = {m: _peer(registry, m) for m in moving}
        answer["dom0"]["guests"] = guest_work(
            held, mac, volumes=by_id, boots=boots, server_url=_http_base(request),
            peers=peers)
        answer["dom0"]["incoming"] = incoming_work(
            coming, mac, volumes=by_id, boots=boots, server_url=_http_base(request),
            peers=peers)
        config = request.app[CONFIG]
        subnets = [config.dhcp.subnet, *config.dhcp.relayed]
        base = urllib.parse.urlsplit(_http_base(request))
        answer["dom0"]["guest_network"] = guest_network(
            [base.hostname, request.url.host], dhcp_port=config.dhcp.port,
            http_port=base.port or 80,
            node_ips=[n.ip for node in registry.list_nodes() for n in node.nics],
            networks=[s.network for s in subnets if s is not None],
            instance_pools=[config.cloud.instance_pool])
    return answer


async def work(request: web.Request) -> web.Response:
    """``GET /api/v1/agent/work?mac=&boot_id=&after=GEN&wait=SECONDS``: answered at once if
    ``after`` is absent or not the current generation, else once it changes or after
    ``wait`` seconds (default 25, at most 60), with the current work either way."""
    session = _session(request)
    node = _authenticate(request, session, {"mac": request.query.get("mac", ""),
                                            "boot_id": request.query.get("boot_id")})
    after = _query_number(request, "after")
    wait = _query_number(request, "wait")
    wait = DEFAULT_WAIT if wait is None else min(wait, MAX_WAIT)
    notifier = request.app[CLOUD]
    if after is not None and int(after) == notifier.generation:
        await notifier.wait(int(after), wait)
    answer = await asyncio.to_thread(_work, request, node.mac, node.role)
    notifier.publish(answer["generation"])
    return web.json_response(answer)


async def report(request: web.Request) -> web.Response:
    """``POST /api/v1/agent/report`` ``{"mac", "boot_id", "generation", "storage"|"dom0"}``
    -> ``{"stored": true, "generation": current}``; a malformed report is a 400 and stores
    nothing."""
    session = _session(request)
    data = await _json_body(request, MAX_REPORT_BYTES)
    node = _authenticate(request, session, data)
    generation = data.get("generation")
    if generation is not None and (isinstance(generation, bool)
                                   or not isinstance(generation, int)):
        raise InvalidRequest("generation must be the integer of the work the report follows")
    body = {k: data[k] for k in ("storage", "dom0") if k in data}
    outcome = await asyncio.to_thread(request.app[REGISTRY].record_cloud_report, node.mac,
                                      body, generation)
    request.app[CLOUD].publish(outcome.generation)
    return web.json_response({"stored": True, "generation": outcome.generation})


async def confirm_claim(request: web.Request) -> web.Response:
    """``POST /api/v1/agent/claim`` ``{"mac", "boot_id", "instance", "epoch"}``: 200
    ``{"held": true}`` if the node holds the instance's claim with that epoch and the
    instance is wanted running, else 409 ``{"held": false, ...}``. A dom0 asks just before
    ``xl create``: work it received earlier may be stale, this answer is not."""
    session = _session(request)
    data = await _json_body(request, 4096)
    node = _authenticate(request, session, data)
    name, epoch = data.get("instance"), data.get("epoch")
    if not isinstance(name, str) or isinstance(epoch, bool) or not isinstance(epoch, int):
        raise InvalidRequest("the body is {\"mac\", \"boot_id\", \"instance\": name, "
                             "\"epoch\": integer}")
    instance = await asyncio.to_thread(request.app[REGISTRY].instance, name)
    if instance is not None and holds(instance, node.mac, epoch):
        return web.json_response({"held": True, "epoch": epoch})
    current = instance.claim if instance is not None else None
    return web.json_response(
        {"held": False, "node": current.node if current else None,
         "epoch": current.epoch if current else None,
         "desired": str(instance.desired) if instance is not None else None}, status=409)


__all__ = ["DEFAULT_WAIT", "MAX_REPORT_BYTES", "MAX_WAIT", "setup_routes"]
