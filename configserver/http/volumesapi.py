"""Replicated volumes over HTTP (``/api/v1/volumes``), for admins and tenants.

A tenant's certificate creates volumes its tenant owns and sees and acts only on those (any
other volume is a 404, as if it did not exist); an admin sees every volume, and volumes an
admin creates belong to nobody (``tenant: null``). The registry validates and places on write
and bumps the cloud generation; the handler then wakes the agents' long polls (``CLOUD``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from configserver.cloud.model import (
    Volume,
    VolumeEvent,
    format_size,
    parse_size,
    validate_volume_name,
)
from configserver.cloud.work import portal
from configserver.errors import InvalidRequest, InvalidSize, NotFound, UnknownImage
from configserver.http.api import read_body
from configserver.http.appkeys import CATALOG, CLOUD, REGISTRY
from configserver.http.auth import IDENTITY
from configserver.images import ImageCatalog
from configserver.model import Node

_CREATE_FIELDS = {"name", "size", "image"}


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/volumes", list_volumes)
    r.add_post("/api/v1/volumes", create_volume)
    r.add_get("/api/v1/volumes/{name}", show_volume)
    r.add_delete("/api/v1/volumes/{name}", delete_volume)
    r.add_post("/api/v1/volumes/{name}/attach", attach_volume)
    r.add_post("/api/v1/volumes/{name}/detach", detach_volume)


def _tenant(request: web.Request) -> str | None:
    """The caller's tenant, or None for an admin (who sees everything)."""
    identity = request[IDENTITY]
    return None if identity.is_admin else identity.tenant


def _visible(request: web.Request, volume: Volume | None) -> bool:
    return volume is not None and (request[IDENTITY].is_admin
                                   or volume.tenant == _tenant(request))


async def _find(request: web.Request) -> Volume:
    name = request.match_info["name"]
    volume = await asyncio.to_thread(request.app[REGISTRY].volume, name)
    if volume is None or not _visible(request, volume):
        raise NotFound(f"no volume {name!r}", hint="see 'configserver volume list'")
    return volume


def volume_json(volume: Volume, nodes: Mapping[str, Node | None],
                timeline: Sequence[VolumeEvent] | None = None) -> dict[str, Any]:
    """A volume as the API shows it; ``nodes`` names the legs' and attachments' nodes."""
    def hostname(mac: str) -> str | None:
        node = nodes.get(mac)
        return node.hostname if node else None

    def leaving(mac: str) -> bool:
        node = nodes.get(mac)
        return node is not None and node.drained is not None

    def ip(mac: str) -> str | None:
        node = nodes.get(mac)
        return next((n.ip for n in node.nics if n.ip), None) if node else None

    body: dict[str, Any] = {
        "id": volume.id, "name": volume.name, "size": volume.size, "image": volume.image,
        "tenant": volume.tenant, "state": str(volume.state),
        "redundancy": str(volume.redundancy), "initialized": volume.initialized,
        "created": volume.created, "updated": volume.updated,
        "legs": [{"node": g.node, "hostname": hostname(g.node), "lv": volume.lv,
                  "target": volume.target, "portal": portal(ip(g.node)), "state": g.state,
                  "member": g.member, "error": g.error, "leaving": leaving(g.node)}
                 for g in volume.legs],
        "attached": [{"node": a.node, "hostname": hostname(a.node), "state": a.state,
                      "device": a.device, "sync": a.sync, "error": a.error}
                     for a in volume.attachments],
        "error": volume.error,
    }
    if timeline is not None:
        body["timeline"] = [e.to_json() for e in timeline]
    return body


def _nodes_of(request: web.Request, volumes: Sequence[Volume]) -> dict[str, Node | None]:
    registry = request.app[REGISTRY]
    macs = {g.node for v in volumes for g in v.legs} | {
        a.node for v in volumes for a in v.attachments}
    return {mac: registry.lookup(mac) for mac in macs}


async def _answer(request: web.Request, volume: Volume, generation: int, *,
                  status: int = 200) -> web.Response:
    request.app[CLOUD].publish(generation)
    nodes = await asyncio.to_thread(_nodes_of, request, [volume])
    return web.json_response(volume_json(volume, nodes), status=status)


async def list_volumes(request: web.Request) -> web.Response:
    volumes = [v for v in await asyncio.to_thread(request.app[REGISTRY].volumes)
               if _visible(request, v)]
    nodes = await asyncio.to_thread(_nodes_of, request, volumes)
    return web.json_response({"volumes": [volume_json(v, nodes) for v in volumes]})


async def show_volume(request: web.Request) -> web.Response:
    volume = await _find(request)
    events = await asyncio.to_thread(request.app[REGISTRY].volume_events, volume.id)
    nodes = await asyncio.to_thread(_nodes_of, request, [volume])
    return web.json_response(volume_json(volume, nodes, events))


def image_for_volume(catalog: ImageCatalog, name: Any, size: int) -> str | None:
    """The image a volume starts from: one of the catalog's that ships a root file system
    no larger than the volume."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise InvalidRequest("'image' must be an image name or null")
    usable = [i.name for i in catalog.list() if i.rootfs]
    image = catalog.get(name)
    hint = ("images with a root file system: " + ", ".join(usable) if usable else
            "no image ships a root file system (manifest key 'rootfs', see docs/api.md)")
    if image is None:
        raise UnknownImage(f"no image {name!r}", hint=hint)
    if not image.rootfs:
        raise UnknownImage(f"image {name!r} has no root file system for volumes", hint=hint)
    path = image.path(image.rootfs)
    try:
        needed = path.stat().st_size if path else 0
    except OSError:
        needed = 0
    if needed > size:
        raise InvalidSize(f"image {name}'s root file system is {format_size(needed)}: a "
                          f"{format_size(size)} volume cannot hold it",
                          hint=f"give --size {-(-needed // (1 << 30))}G "
                               "or more (the file system grows to fill the volume)")
    return name


async def create_volume(request: web.Request) -> web.Response:
    """``{"name", "size": bytes or "2G", "image"?}`` -> 201, the volume (state creating)."""
    data = await read_body(request)
    unknown = set(data) - _CREATE_FIELDS
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(sorted(unknown))}")
    name = validate_volume_name(data.get("name"))
    size = parse_size(data.get("size"))
    image = image_for_volume(request.app[CATALOG], data.get("image"), size)
    volume, generation = await asyncio.to_thread(
        request.app[REGISTRY].create_volume, name, size, image, _tenant(request))
    return await _answer(request, volume, generation, status=201)


async def delete_volume(request: web.Request) -> web.Response:
    volume = await _find(request)
    deleting, generation = await asyncio.to_thread(request.app[REGISTRY].delete_volume,
                                                   volume.name)
    return await _answer(request, deleting, generation, status=202)


async def _node_of(request: web.Request, *, force: bool = False) -> tuple[str, bool]:
    data = await read_body(request)
    allowed = {"node", "force"} if force else {"node"}
    if set(data) - allowed or not isinstance(data.get("node"), str) or not data["node"]:
        raise InvalidRequest("the body is {\"node\": hostname or MAC"
                             + (", \"force\": true|false}" if force else "}"))
    if not isinstance(data.get("force", False), bool):
        raise InvalidRequest("force must be true or false")
    return str(data["node"]), bool(data.get("force", False))


async def attach_volume(request: web.Request) -> web.Response:
    """``{"node": dom0 hostname or MAC}``: let that dom0 assemble the volume (one at a time)."""
    volume = await _find(request)
    node, _ = await _node_of(request)
    attached, generation = await asyncio.to_thread(request.app[REGISTRY].attach_volume,
                                                   volume.name, node)
    return await _answer(request, attached, generation)


async def detach_volume(request: web.Request) -> web.Response:
    """``{"node", "force"?}``: in order, or with ``force`` at once (fencing the dom0)."""
    volume = await _find(request)
    node, force = await _node_of(request, force=True)
    detaching, generation = await asyncio.to_thread(
        functools.partial(request.app[REGISTRY].detach_volume, volume.name, node,
                          force=force))
    return await _answer(request, detaching, generation)


__all__ = ["image_for_volume", "setup_routes", "volume_json"]
