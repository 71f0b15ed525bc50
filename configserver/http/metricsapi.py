"""``GET /metrics`` (the Prometheus text format, rendered by prometheus-client) and
``GET /api/v1/prometheus/targets`` (Prometheus' HTTP service discovery: the config server and
every agent whose API it can reach), both for admins and monitors (``configserver user add
NAME --monitor``); the request counter middleware; the event loop's lag watcher.

The exposition is rendered in a worker thread: its collectors read the registry, and the
event loop keeps answering DHCP, TFTP and HTTP meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from configserver.http.appkeys import API_BASE, METRICS, REGISTRY
from configserver.http.consoleapi import agent_api
from configserver.model import Node, NodeState
from configserver.telemetry.collectors import RegistryCollector
from configserver.telemetry.metrics import CONTENT_TYPE, ServerMetrics
from configserver.timeline import boot_timeline

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Answered without a route (404s, scanners): one label value, so they cannot grow the series.
UNROUTED = "(none)"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count each answered request by its route's pattern (not its path), method and status."""
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else UNROUTED
        method = request.method if request.method in METHODS else "other"
        request.app[METRICS].http_requests.labels(route, method, str(status)).inc()


async def metrics(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(request.app[METRICS].exposition)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def targets(request: web.Request) -> web.Response:
    """``[{"targets": ["HOST:PORT"], "labels": {...}}]``: the config server's HTTPS API, then
    each node whose agent serves HTTPS on an address the config server saw it at."""
    nodes = await asyncio.to_thread(request.app[REGISTRY].list_nodes)
    groups: list[dict[str, Any]] = []
    base = urllib.parse.urlsplit(request.app[API_BASE] or "")
    if base.hostname and base.port:
        groups.append({"targets": [_hostport(base.hostname, base.port)],
                       "labels": {"__scheme__": "https", "__metrics_path__": "/metrics",
                                  "netboot_component": "configserver"}})
    for node in nodes:
        target = agent_target(node)
        if target is not None:
            groups.append({"targets": [target], "labels": {
                "__scheme__": "https", "__metrics_path__": "/metrics",
                "netboot_component": "agent", "mac": node.mac,
                "hostname": node.hostname or "", "role": node.role or ""}})
    return web.json_response(groups)


def agent_target(node: Node) -> str | None:
    """``HOST:PORT`` of a ready node's agent API, if it serves one off loopback."""
    reachable = agent_api(node) if node.state == NodeState.READY else None
    return _hostport(*reachable) if reachable is not None else None


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def observe_boot(app: web.Application, mac: str) -> None:
    """A node just became ready: its boot's stages go into the boot histograms."""
    try:
        events = await asyncio.to_thread(app[REGISTRY].events, mac)
        app[METRICS].boot_finished(boot_timeline(events))
    except Exception:
        log.exception("%s: the boot's durations were not recorded", mac)


async def _loop_lag(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[METRICS].watch_loop(), name="event-loop-lag")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def setup(app: web.Application) -> None:
    """Before the routes: the metrics object itself, then the endpoints and the watcher."""
    app[METRICS] = ServerMetrics()
    app[METRICS].add(RegistryCollector(app[REGISTRY]))
    writer = getattr(app[REGISTRY], "writer", None)
    if writer is not None:
        writer.on_timing = app[METRICS].registry_timing
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/prometheus/targets", targets)
    app.cleanup_ctx.append(_loop_lag)
