"""The REST API (``/api/v1``): nodes, roles, boot events, bulk apply, settings and images.

Who may call what is decided in one place, ``auth.py`` (every route here needs an admin, but
``health``). Request bodies are checked here for shape (types, unknown fields); the registry
validates values and relationships on write.

Registry writes wait for their commit, and some reads are large (a page of nodes, an export, a
node's events): those calls run on a worker thread (``asyncio.to_thread``), never on the event
loop that also answers DHCP and TFTP.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from aiohttp import web

from configserver.cloud.drain import drain_status
from configserver.errors import InvalidRequest, NotFound
from configserver.http.appkeys import CATALOG, CLOUD, REGISTRY
from configserver.model import (
    Nic,
    Node,
    NodeSpec,
    NodeState,
    Role,
    UnknownMacPolicy,
    normalize_mac,
)
from configserver.registry import Registry
from configserver.timeline import boot_timeline

NODES_PAGE = 500  # nodes per page of GET /api/v1/nodes by default
NODES_PAGE_MAX = 1000
_SPEC_FIELDS = {"mac", "role", "hostname", "ip", "kernel_args", "tags", "nics"}
_ROLE_FIELDS = {"name", "image", "template", "kernel_args", "hypervisor_args", "description"}


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/health", health)
    r.add_get("/api/v1/nodes", list_nodes)
    r.add_post("/api/v1/nodes", add_node)
    r.add_get("/api/v1/nodes/{mac}", show_node)
    r.add_patch("/api/v1/nodes/{mac}", update_node)
    r.add_delete("/api/v1/nodes/{mac}", remove_node)
    r.add_get("/api/v1/nodes/{mac}/events", node_events)
    r.add_get("/api/v1/nodes/{mac}/inventory", node_inventory)
    r.add_post("/api/v1/nodes/{mac}/drain", drain_node)
    r.add_post("/api/v1/nodes/{mac}/undrain", undrain_node)
    r.add_get("/api/v1/roles", list_roles)
    r.add_post("/api/v1/roles", add_role)
    r.add_get("/api/v1/roles/{name}", show_role)
    r.add_patch("/api/v1/roles/{name}", update_role)
    r.add_delete("/api/v1/roles/{name}", remove_role)
    r.add_post("/api/v1/apply", apply_inventory)
    r.add_get("/api/v1/export", export)
    r.add_get("/api/v1/settings", show_settings)
    r.add_patch("/api/v1/settings", update_settings)
    r.add_get("/api/v1/images", list_images)


def bearer_token(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header; None without one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def read_body(request: web.Request) -> dict[str, Any]:
    data = await request.json()
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


def spec_from_json(data: Any, *, where: str = "node") -> NodeSpec:
    """A NodeSpec from its JSON form, refusing unknown fields and wrong types."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"{where} must be a JSON object")
    unknown = set(data) - _SPEC_FIELDS
    if unknown:
        raise InvalidRequest(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    for key in ("mac", "role"):
        if not isinstance(data.get(key), str):
            raise InvalidRequest(f"{where}: '{key}' is required and must be a string")
    _check_types(data, where)
    return NodeSpec(mac=data["mac"], role=data["role"], hostname=data.get("hostname") or None,
                    ip=data.get("ip") or None, kernel_args=data.get("kernel_args") or "",
                    tags=tuple(data.get("tags", [])),
                    extra_nics=_nics(data.get("nics", []), where))


def _check_types(data: dict[str, Any], where: str) -> None:
    """The JSON types of a node's fields, where present; the registry checks the values."""
    for key in ("role", "hostname", "ip", "kernel_args"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise InvalidRequest(f"{where}: '{key}' must be a string")
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidRequest(f"{where}: 'tags' must be a list of strings")


def _nics(data: Any, where: str) -> tuple[Nic, ...]:
    if not isinstance(data, list):
        raise InvalidRequest(f"{where}: 'nics' must be a list of {{mac, ip}} objects")
    nics = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("mac"), str) or (
                item.get("ip") is not None and not isinstance(item["ip"], str)) or (
                set(item) - {"mac", "ip"}):
            raise InvalidRequest(f"{where}: each NIC is an object {{mac, ip}}")
        nics.append(Nic(item["mac"], item.get("ip") or None))
    return tuple(nics)


def _node_changes(data: dict[str, Any]) -> dict[str, Any]:
    """The changes of a PATCH, typed; unknown fields are the registry's to refuse."""
    _check_types(data, "node")
    changes = dict(data)
    if "nics" in changes:
        changes["nics"] = _nics(changes["nics"], "node")
    for key in ("hostname", "ip"):
        if key in changes and not changes[key]:
            changes[key] = None
    return changes


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _number(request: web.Request, name: str, default: int, top: int) -> int:
    try:
        return max(1, min(int(request.query.get(name, str(default))), top))
    except ValueError:
        raise InvalidRequest(f"{name} must be a number") from None


async def list_nodes(request: web.Request) -> web.Response:
    """One page of nodes in MAC order; ``next`` is the ``after`` of the next page, or null."""
    state = request.query.get("state")
    try:
        wanted = NodeState(state) if state else None
    except ValueError:
        raise InvalidRequest(f"unknown state {state!r}") from None
    limit = _number(request, "limit", NODES_PAGE, NODES_PAGE_MAX)
    after = request.query.get("after")
    after = normalize_mac(after) if after else None
    nodes = await asyncio.to_thread(request.app[REGISTRY].list_nodes, state=wanted,
                                    limit=limit + 1, after=after)
    more = len(nodes) > limit
    nodes = nodes[:limit]
    return web.json_response({"nodes": [n.to_json() for n in nodes],
                              "next": nodes[-1].mac if more else None})


async def add_node(request: web.Request) -> web.Response:
    spec = spec_from_json(await read_body(request))
    node = await asyncio.to_thread(request.app[REGISTRY].add_node, spec)
    return web.json_response(node.to_json(), status=201)


def _node_json(registry: Registry, node: Node) -> dict[str, Any]:
    """A node as ``GET /api/v1/nodes/{mac}`` shows it (reads the registry: off the loop)."""
    events = registry.events(node.mac)
    body = node.to_json()
    body["timeline"] = boot_timeline(events)
    body["inventory"] = registry.inventory(node.mac)
    body["events"] = [e.to_json() for e in events[-50:]]
    body["drain"] = drain_status(node, registry.volumes()) or registry.dom0_drain(node)
    return body


async def show_node(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    mac = normalize_mac(request.match_info["mac"])

    def read() -> dict[str, Any]:
        node = registry.lookup(mac)
        if node is None:
            raise NotFound(f"no node with MAC {mac}")
        return _node_json(registry, node)

    return web.json_response(await asyncio.to_thread(read))


async def _drain_answer(request: web.Request,
                        change: Callable[[str], tuple[Node, int]]) -> web.Response:
    """Drain or undrain the node the path names (a MAC of any of its NICs, or its hostname),
    wake the agents' long polls, and answer the node."""
    node, generation = await asyncio.to_thread(change, request.match_info["mac"])
    request.app[CLOUD].publish(generation)
    body = await asyncio.to_thread(_node_json, request.app[REGISTRY], node)
    return web.json_response(body)


async def drain_node(request: web.Request) -> web.Response:
    """Planned maintenance: nothing new placed there; a storage node's legs leave the
    arrays, a dom0's instances migrate away (``{"parallel": N}`` at a time)."""
    body = await read_body(request) if request.can_read_body else {}
    if set(body) - {"parallel"}:
        raise InvalidRequest('the body of a drain is {} or {"parallel": N}')
    # Its value is the registry's to check (``cloud.drain.parallel``), before any write.
    return await _drain_answer(request, functools.partial(request.app[REGISTRY].drain_node,
                                                          parallel=body.get("parallel")))


async def undrain_node(request: web.Request) -> web.Response:
    return await _drain_answer(request, request.app[REGISTRY].undrain_node)


async def update_node(request: web.Request) -> web.Response:
    changes = _node_changes(await read_body(request))
    node = await asyncio.to_thread(request.app[REGISTRY].update_node,
                                   request.match_info["mac"], changes)
    return web.json_response(node.to_json())


async def remove_node(request: web.Request) -> web.Response:
    await asyncio.to_thread(request.app[REGISTRY].remove_node, request.match_info["mac"])
    return web.json_response({"removed": normalize_mac(request.match_info["mac"])})


async def node_events(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    mac = normalize_mac(request.match_info["mac"])
    limit = _number(request, "limit", 500, 5000)
    events = await asyncio.to_thread(registry.events, mac, limit)
    if not events and registry.lookup(mac) is None:
        raise NotFound(f"no node with MAC {mac}")
    return web.json_response({"mac": mac, "events": [e.to_json() for e in events],
                              "timeline": boot_timeline(events)})


async def node_inventory(request: web.Request) -> web.Response:
    mac = normalize_mac(request.match_info["mac"])
    inventory = await asyncio.to_thread(request.app[REGISTRY].inventory, mac)
    if inventory is None:
        raise NotFound(f"no inventory for {mac}")
    return web.json_response(inventory)


def _role_from_json(data: dict[str, Any]) -> Role:
    unknown = set(data) - _ROLE_FIELDS
    if unknown:
        raise InvalidRequest(f"role: unknown field(s) {', '.join(sorted(unknown))}")
    if not isinstance(data.get("name"), str):
        raise InvalidRequest("role: 'name' is required")
    fields = {k: v for k, v in data.items() if v is not None}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise InvalidRequest(f"role: '{key}' must be a string")
    fields.setdefault("image", fields["name"])
    return Role(**fields)


async def list_roles(request: web.Request) -> web.Response:
    roles = request.app[REGISTRY].list_roles()
    return web.json_response({"roles": [r.to_json() for r in roles]})


async def add_role(request: web.Request) -> web.Response:
    role = await asyncio.to_thread(request.app[REGISTRY].add_role,
                                   _role_from_json(await read_body(request)))
    return web.json_response(role.to_json(), status=201)


async def show_role(request: web.Request) -> web.Response:
    role = request.app[REGISTRY].role(request.match_info["name"])
    if role is None:
        raise NotFound(f"no role {request.match_info['name']!r}")
    body = role.to_json()
    image = request.app[CATALOG].get(role.image)
    body["image_built"] = image is not None
    return web.json_response(body)


async def update_role(request: web.Request) -> web.Response:
    changes = await read_body(request)
    if not all(isinstance(v, str) for v in changes.values()):
        raise InvalidRequest("role fields are strings")
    role = await asyncio.to_thread(request.app[REGISTRY].update_role,
                                   request.match_info["name"], changes)
    return web.json_response(role.to_json())


async def remove_role(request: web.Request) -> web.Response:
    await asyncio.to_thread(request.app[REGISTRY].remove_role, request.match_info["name"])
    return web.json_response({"removed": request.match_info["name"]})


async def apply_inventory(request: web.Request) -> web.Response:
    """Declarative bulk create/update of roles and nodes, in one transaction."""
    data = await read_body(request)
    unknown = set(data) - {"nodes", "roles", "prune"}
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(sorted(unknown))}")
    nodes, roles = data.get("nodes", []), data.get("roles", [])
    if not isinstance(nodes, list) or not isinstance(roles, list):
        raise InvalidRequest("'nodes' and 'roles' must be lists")
    prune = data.get("prune", False)
    if not isinstance(prune, bool):
        raise InvalidRequest("'prune' must be true or false")
    if not all(isinstance(r, dict) for r in roles):
        raise InvalidRequest("each role is an object")
    role_specs = [_role_from_json(r) for r in roles]
    specs = [spec_from_json(n, where=f"node #{i + 1}") for i, n in enumerate(nodes)]
    result = await asyncio.to_thread(request.app[REGISTRY].apply, specs, prune=prune,
                                     roles=role_specs)
    return web.json_response(result.to_json())


async def export(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    nodes = [n for n in await asyncio.to_thread(registry.list_nodes)
             if n.state != NodeState.PENDING]
    roles = [r for r in registry.list_roles() if not r.builtin]
    return web.json_response({
        "roles": [{k: v for k, v in r.to_json().items() if k in _ROLE_FIELDS} for r in roles],
        "nodes": [_spec_json(n.spec()) for n in nodes],
    })


def _spec_json(spec: NodeSpec) -> dict[str, Any]:
    body: dict[str, Any] = {"mac": spec.mac, "role": spec.role}
    if spec.hostname:
        body["hostname"] = spec.hostname
    if spec.ip:
        body["ip"] = spec.ip
    if spec.kernel_args:
        body["kernel_args"] = spec.kernel_args
    if spec.tags:
        body["tags"] = list(spec.tags)
    if spec.extra_nics:
        body["nics"] = [{"mac": n.mac, **({"ip": n.ip} if n.ip else {})}
                        for n in spec.extra_nics]
    return body


async def show_settings(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    return web.json_response({"unknown_mac": str(registry.unknown_mac_policy())})


async def update_settings(request: web.Request) -> web.Response:
    data = await read_body(request)
    if set(data) - {"unknown_mac"}:
        raise InvalidRequest("only 'unknown_mac' can be set")
    if "unknown_mac" in data:
        try:
            policy = UnknownMacPolicy(data["unknown_mac"])
        except ValueError:
            raise InvalidRequest("unknown_mac is 'ignore' or 'discover'") from None
        await asyncio.to_thread(request.app[REGISTRY].set_unknown_mac_policy, policy)
    return await show_settings(request)


async def list_images(request: web.Request) -> web.Response:
    return web.json_response({"images": [i.to_json() for i in request.app[CATALOG].list()]})
