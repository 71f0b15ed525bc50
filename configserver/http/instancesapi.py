"""Instances (Xen guests) over HTTP (``/api/v1/instances``), for admins and tenants.

As with volumes, a tenant's certificate creates instances its tenant owns and sees and acts
only on those (any other is a 404); an admin sees all. Creating one creates its volume
``<name>-disk`` from the image in the same write, with a MAC in Xen's range and an address
from the instance pool (``[cloud] instance_pool``). Start, stop, reboot and destroy change
the desired state and the guest map in one registry write each; the dom0 holding the claim
carries it out and reports back. Each change wakes the agents' long polls (``CLOUD``).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from configserver.cloud import resources
from configserver.cloud.instances import (
    Instance,
    to_json,
    validate_instance_name,
    validate_memory,
    validate_vcpus,
)
from configserver.cloud.model import parse_size
from configserver.errors import Forbidden, InvalidRequest, NotFound, UnknownImage
from configserver.http.api import read_body
from configserver.http.appkeys import CATALOG, CLOUD, CONFIG, REGISTRY
from configserver.http.auth import IDENTITY
from configserver.http.volumesapi import image_for_volume

_CREATE_FIELDS = {"name", "memory", "vcpus", "image", "disk", "ip", "ssh_keys",
                  *resources.FIELDS}
_CHANGE_FIELDS = {"memory", *resources.FIELDS}
DEFAULT_MEMORY = "256M"
DEFAULT_DISK = "2G"
MAX_SSH_KEYS = 32
MAX_SSH_KEY_LENGTH = 16384


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/instances", list_instances)
    r.add_post("/api/v1/instances", create_instance)
    r.add_get("/api/v1/instances/{name}", show_instance)
    r.add_delete("/api/v1/instances/{name}", destroy_instance)
    r.add_post("/api/v1/instances/{name}/start", start_instance)
    r.add_post("/api/v1/instances/{name}/stop", stop_instance)
    r.add_post("/api/v1/instances/{name}/migrate", migrate_instance)
    r.add_post("/api/v1/instances/{name}/reboot", reboot_instance)
    r.add_get("/api/v1/instances/{name}/usage", instance_usage)
    r.add_patch("/api/v1/instances/{name}", change_instance)


def _tenant(request: web.Request) -> str | None:
    identity = request[IDENTITY]
    return None if identity.is_admin else identity.tenant


def _visible(request: web.Request, instance: Instance | None) -> bool:
    return instance is not None and (request[IDENTITY].is_admin
                                     or instance.tenant == _tenant(request))


async def find_instance(request: web.Request) -> Instance:
    name = request.match_info["name"]
    instance = await asyncio.to_thread(request.app[REGISTRY].instance, name)
    if instance is None or not _visible(request, instance):
        raise NotFound(f"no instance {name!r}", hint="see 'configserver instance list'")
    return instance


def instance_json(instance: Instance, hostnames: Mapping[str, str | None],
                  disks: Mapping[str, str], timeline: list[dict[str, Any]] | None = None
                  ) -> dict[str, Any]:
    """An instance as the API shows it: the guest map's dom0 by MAC and hostname, its disk by
    volume name."""
    body = to_json(instance)
    body["hostname"] = hostnames.get(body["node"]) if body["node"] else None
    body["disk"] = disks.get(instance.volume or "")
    if timeline is not None:
        body["timeline"] = timeline
    return body


def _names(request: web.Request, instances: list[Instance]
           ) -> tuple[dict[str, str | None], dict[str, str]]:
    registry = request.app[REGISTRY]
    hostnames = {}
    for mac in {i.claim.node for i in instances if i.claim}:
        node = registry.lookup(mac)
        hostnames[mac] = node.hostname if node else None
    disks = {v.id: v.name for v in registry.volumes()} if instances else {}
    return hostnames, disks


async def _answer(request: web.Request, instance: Instance, generation: int, *,
                  status: int = 200) -> web.Response:
    request.app[CLOUD].publish(generation)
    hostnames, disks = await asyncio.to_thread(_names, request, [instance])
    return web.json_response(instance_json(instance, hostnames, disks), status=status)


async def list_instances(request: web.Request) -> web.Response:
    instances = [i for i in await asyncio.to_thread(request.app[REGISTRY].instances)
                 if _visible(request, i)]
    hostnames, disks = await asyncio.to_thread(_names, request, instances)
    return web.json_response({"instances": [instance_json(i, hostnames, disks)
                                            for i in instances]})


async def show_instance(request: web.Request) -> web.Response:
    instance = await find_instance(request)
    events = await asyncio.to_thread(request.app[REGISTRY].instance_events, instance.id)
    hostnames, disks = await asyncio.to_thread(_names, request, [instance])
    return web.json_response(instance_json(instance, hostnames, disks, events))


def ssh_keys_from(value: Any) -> tuple[str, ...]:
    """Public SSH keys, one line each (a private key or anything else is refused)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise InvalidRequest("ssh_keys must be a list of public keys (strings)")
    if len(value) > MAX_SSH_KEYS:
        raise InvalidRequest(f"at most {MAX_SSH_KEYS} SSH keys per instance")
    keys = []
    for key in (k.strip() for k in value):
        if ("\n" in key or len(key) > MAX_SSH_KEY_LENGTH or len(key.split()) < 2
                or not key.startswith(("ssh-", "ecdsa-", "sk-"))):
            raise InvalidRequest(f"not an SSH public key: {key[:40]!r}",
                                 hint="give the .pub line of a key (ssh-ed25519 AAAA...)")
        keys.append(key)
    return tuple(keys)


def _boot_image(request: web.Request, name: Any, disk: int) -> str:
    """An image the instance boots: a root file system for its disk, and a kernel."""
    image_name = image_for_volume(request.app[CATALOG], name, disk)
    if image_name is None:
        raise InvalidRequest("an instance needs an image (e.g. \"image\": \"guest\")")
    image = request.app[CATALOG].get(image_name or "")
    if image is None or image.path(image.kernel) is None:
        raise UnknownImage(f"image {name!r} ships no kernel to boot a guest with")
    return str(image_name)


async def create_instance(request: web.Request) -> web.Response:
    """``{"name", "image", "memory"?: "256M", "vcpus"?: 1, "disk"?: "2G", "ip"?,
    "ssh_keys"?: [...]}`` -> 201, the instance (stopped) and its volume (creating)."""
    data = await read_body(request)
    unknown = set(data) - _CREATE_FIELDS
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(sorted(unknown))}")
    name = validate_instance_name(data.get("name"))
    memory = validate_memory(parse_size(data.get("memory", DEFAULT_MEMORY)))
    vcpus = validate_vcpus(data.get("vcpus", 1))
    disk = parse_size(data.get("disk", DEFAULT_DISK))
    image = _boot_image(request, data.get("image"), disk)
    ip = data.get("ip")
    if ip is not None and not isinstance(ip, str):
        raise InvalidRequest("ip must be an IPv4 address or null")
    _admin_for_controls(request, data)
    wanted = resources.updated(resources.Resources(),
                               {k: data[k] for k in resources.FIELDS if k in data},
                               memory=memory, vcpus=vcpus, running=False)
    pool = request.app[CONFIG].cloud.instance_pool
    if ip is not None and pool is None and _tenant(request) is not None:
        # With no pool, any address of the network could be named: an admin's choice only.
        raise Forbidden("only an admin names an instance's address on a server without an "
                        "instance pool", hint="leave ip out, or ask an admin")
    instance, generation = await asyncio.to_thread(functools.partial(
        request.app[REGISTRY].create_instance_with_disk, name=name, memory=memory,
        vcpus=vcpus, image=image, disk=disk, tenant=_tenant(request),
        ssh_keys=ssh_keys_from(data.get("ssh_keys")),
        pool=pool, ip=ip, resources=wanted))
    return await _answer(request, instance, generation, status=201)


async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    data = await read_body(request) if request.can_read_body else {}
    unknown = set(data) - allowed
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(sorted(unknown))}")
    return data


async def _dom0_field(request: web.Request, field: str) -> str | None:
    """The body's only field ``field``, a dom0's hostname or MAC, if given."""
    value = (await _body(request, {field})).get(field)
    if value is not None and (not isinstance(value, str) or not value):
        raise InvalidRequest(f"{field} must be a dom0's hostname or MAC")
    return value


async def start_instance(request: web.Request) -> web.Response:
    """``{"node"?: dom0 hostname or MAC}`` (admins only; else the scheduler's choice, or the
    dom0 already holding it) -> the instance, wanted running there."""
    instance = await find_instance(request)
    node = await _dom0_field(request, "node")
    if node is not None and not request[IDENTITY].is_admin:
        raise Forbidden("only an admin places an instance on a dom0",
                        hint="leave out the node: the scheduler picks one")
    started, generation = await asyncio.to_thread(functools.partial(
        request.app[REGISTRY].start_instance, instance.name, node, expect=instance.id))
    return await _answer(request, started, generation)


async def migrate_instance(request: web.Request) -> web.Response:
    """``{"to"?: dom0 hostname or MAC}`` (admins only) -> 202, the instance with its
    ``migration``: checked first (running, the target's memory and Xen version, a leg of the
    disk in sync), then carried out by the two dom0s; the map changes once both are done."""
    instance = await find_instance(request)
    to = await _dom0_field(request, "to")
    if not request[IDENTITY].is_admin:
        raise Forbidden("only an admin migrates an instance",
                        hint="ask the provider; a tenant's instances move with maintenance")
    moving, generation = await asyncio.to_thread(functools.partial(
        request.app[REGISTRY].migrate_instance, instance.name, to, expect=instance.id))
    return await _answer(request, moving, generation, status=202)


async def _asked(request: web.Request, change: str) -> web.Response:
    """A change without a body (``stop_instance``, ``reboot_instance`` of the registry): 202,
    the dom0 holding the claim carries it out."""
    instance = await find_instance(request)
    await _body(request, set())
    changed, generation = await asyncio.to_thread(functools.partial(
        getattr(request.app[REGISTRY], change), instance.name, expect=instance.id))
    return await _answer(request, changed, generation, status=202)


def _admin_for_controls(request: web.Request, data: Mapping[str, Any]) -> None:
    """Weight, cap, rate and the memory ceiling are the provider's to set (a tenant would give
    itself all of a dom0); a tenant changes its memory within the ceiling."""
    asked = sorted(set(data) & set(resources.FIELDS))
    if asked and not request[IDENTITY].is_admin:
        raise Forbidden(f"only an admin sets {', '.join(asked)}",
                        hint="a tenant may change its memory within max_memory")


async def change_instance(request: web.Request) -> web.Response:
    """``{"memory"?, "cpu_weight"?, "cpu_cap"?, "net_rate"?, "max_memory"?}`` -> the
    instance; its dom0 applies the change to the running guest."""
    instance = await find_instance(request)
    data = await _body(request, _CHANGE_FIELDS)
    if not data:
        raise InvalidRequest("nothing to change", hint="one of: " + ", ".join(
            sorted(_CHANGE_FIELDS)))
    _admin_for_controls(request, data)
    if "memory" in data:
        data["memory"] = validate_memory(parse_size(data["memory"]))
    changed, generation = await asyncio.to_thread(functools.partial(
        request.app[REGISTRY].set_instance_resources, instance.name, data,
        expect=instance.id))
    return await _answer(request, changed, generation)


async def stop_instance(request: web.Request) -> web.Response:
    return await _asked(request, "stop_instance")


async def reboot_instance(request: web.Request) -> web.Response:
    return await _asked(request, "reboot_instance")


async def destroy_instance(request: web.Request) -> web.Response:
    """``?delete_disk=true`` deletes its volume too. 202: the instance stays listed (desired
    destroyed) until its dom0 reports the domain gone; 200 with ``gone: true`` if it was not
    placed anywhere and is forgotten at once."""
    instance = await find_instance(request)
    flag = request.query.get("delete_disk", "false").lower()
    if flag not in ("true", "false", "1", "0", "yes", "no"):
        raise InvalidRequest("delete_disk must be true or false")
    destroying, generation = await asyncio.to_thread(functools.partial(
        request.app[REGISTRY].destroy_instance, instance.name,
        delete_disk=flag in ("true", "1", "yes"), expect=instance.id))
    request.app[CLOUD].publish(generation)
    gone = destroying.claim is None  # no dom0 ran it: forgotten in that same write
    hostnames, disks = await asyncio.to_thread(_names, request, [destroying])
    body = {**instance_json(destroying, hostnames, disks), "gone": gone}
    return web.json_response(body, status=200 if gone else 202)


def parse_since(value: str | None) -> float | None:
    """``since``: unix seconds or an ISO 8601 time (UTC unless it names its zone)."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"since: not a time: {value!r:.60}",
                             hint="unix seconds, or ISO 8601 such as 2026-12-01T00:00:00Z"
                             ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


async def instance_usage(request: web.Request) -> web.Response:
    """``?since=T`` -> ``{"instance", "id", "since", "until", "usage": {counter: grown},
    "total": {counter: since created}}``; ``since`` is rounded down to the sample before it
    (every few minutes)."""
    instance = await find_instance(request)
    since = parse_since(request.query.get("since"))
    data = await asyncio.to_thread(request.app[REGISTRY].instance_usage, instance.name, since)
    return web.json_response(data)


__all__ = ["instance_json", "parse_since", "setup_routes", "ssh_keys_from"]
