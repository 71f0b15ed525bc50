"""DHCP leases and the purges of unregistered machines: ``/api/v1/leases`` and node purges.

* ``GET /api/v1/leases[?unknown=1]``: the DHCP server's leases and offers, each saying whether
  its MAC is registered (``unknown=1``: only those of unregistered MACs).
* ``POST /api/v1/leases/purge`` ``{"unknown": true}``: end every lease and offer of an
  unregistered MAC now (after a flood of random MACs); admin token.
* ``POST /api/v1/nodes/purge`` ``{"state": "pending", "older_than": SECONDS}``: remove the
  pending (discovered) nodes, or those not seen for ``older_than`` seconds; admin token.

The lease store lives on the event loop: snapshots and purges happen there, the registry
lookups that tell registered from unregistered MACs on a worker thread.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import web

from configserver.errors import InvalidRequest, ServerUnavailable
from configserver.http.api import read_body
from configserver.http.appkeys import REGISTRY
from configserver.model import NodeState
from configserver.registry import Registry

if TYPE_CHECKING:
    from configserver.dhcp.leases import Lease
    from configserver.dhcp.service import DhcpService


class DhcpAccess:
    """The running DHCP service, once there is one (``serve`` sets it)."""

    def __init__(self) -> None:
        self.service: DhcpService | None = None

    def get(self) -> DhcpService:
        if self.service is None:
            raise ServerUnavailable("the DHCP server is not running (dhcp mode off)",
                                    hint="leases exist only with --dhcp full or proxy")
        return self.service


DHCP = web.AppKey("dhcp", DhcpAccess)


def setup_routes(app: web.Application) -> None:
    app[DHCP] = DhcpAccess()
    app.router.add_get("/api/v1/leases", list_leases)
    app.router.add_post("/api/v1/leases/purge", purge_leases)
    app.router.add_post("/api/v1/nodes/purge", purge_nodes)


def _registered(registry: Registry, macs: set[str]) -> set[str]:
    """Those of ``macs`` that belong to a registered (not pending) node."""
    known = set()
    for mac in macs:
        node = registry.lookup(mac)
        if node is not None and node.state != NodeState.PENDING:
            known.add(mac)
    return known


def lease_json(lease: Lease, registered: bool) -> dict[str, Any]:
    return {"ip": lease.ip, "mac": lease.mac, "state": str(lease.state),
            "expires": lease.expires, "hostname": lease.hostname, "registered": registered}


async def _unregistered_leases(request: web.Request) -> tuple[DhcpService, list[Lease],
                                                               set[str]]:
    service = request.app[DHCP].get()
    now = service.leases.now()
    leases = [lease for lease in service.leases if lease.active(now)
              and str(lease.state) in ("offered", "bound")]
    registered = await asyncio.to_thread(_registered, request.app[REGISTRY],
                                         {lease.mac for lease in leases})
    return service, leases, registered


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise InvalidRequest(f"{name} must be true or false, not {value!r}")


async def list_leases(request: web.Request) -> web.Response:
    only_unknown = _flag(request.query.get("unknown", ""), "unknown")
    _, leases, registered = await _unregistered_leases(request)
    body = [lease_json(lease, lease.mac in registered)
            for lease in sorted(leases, key=lambda x: x.ip)
            if not (only_unknown and lease.mac in registered)]
    return web.json_response({"leases": body})


async def purge_leases(request: web.Request) -> web.Response:
    data = await read_body(request)
    if set(data) - {"unknown"} or not _flag(data.get("unknown", False), "unknown"):
        raise InvalidRequest("only the leases of unregistered MACs can be purged",
                             hint='send {"unknown": true}')
    service, leases, registered = await _unregistered_leases(request)
    ended = await service.purge({lease.mac for lease in leases} - registered)
    return web.json_response({"purged": [lease_json(lease, False) for lease in ended]})


async def purge_nodes(request: web.Request) -> web.Response:
    data = await read_body(request)
    if set(data) - {"state", "older_than"} or data.get("state") != "pending":
        raise InvalidRequest("only pending (discovered) nodes can be purged",
                             hint='send {"state": "pending"[, "older_than": SECONDS]}')
    older_than = data.get("older_than")
    if older_than is not None and (isinstance(older_than, bool)
                                   or not isinstance(older_than, (int, float))
                                   or older_than < 0):
        raise InvalidRequest("older_than is a number of seconds")
    removed = await asyncio.to_thread(request.app[REGISTRY].purge_pending, older_than)
    return web.json_response({"removed": removed})
