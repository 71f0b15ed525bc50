"""The agent's own API: ``/v1/status``, ``/v1/inventory``, ``/v1/role``, ``/metrics`` (the
Prometheus text format: ``nodeagent.metrics``), and on a dom0 ``/v1/console/<domain>`` (a
websocket: ``nodeagent.roles.console``) and ``POST /v1/migrations/<id>/released`` (a
migration's source, to its target: ``nodeagent.roles.migration``).

Once the node holds its certificate the API speaks HTTPS only, with that certificate. A request
is let in if it carries ``Authorization: Bearer <agent token>``, the token the config server
issued for this boot (in ``state_dir/token.json``, readable by root only), or a client
certificate of the config server's CA naming an admin or a node (another agent); ``/metrics``
also for a monitor's certificate (a Prometheus server: ``configserver user add NAME
--monitor``). Before the agent holds a token every request is refused. A guest's console is
the config server's only (it relays it with its own admin certificate, after its own checks),
or the local root's with the token.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from nodeagent import __version__
from nodeagent.errors import AgentError, NotFound, Unauthorized
from nodeagent.metrics import CONTENT_TYPE, AgentMetrics
from nodeagent.peers import IDENTITY_URN, peer_identity
from nodeagent.roles.console import Consoles
from nodeagent.session import AgentSession

log = logging.getLogger(__name__)

SESSION = web.AppKey("session", AgentSession)
CONSOLES = web.AppKey("consoles", Consoles)
METRICS = web.AppKey("metrics", AgentMetrics)
# The config server's own client certificate (configserver.pki.tls.AGENT_CLIENT).
CONSOLE_RELAY = f"{IDENTITY_URN}admin:configserver"
# Whose certificates may call this API: the operators, and other nodes' agents.
ALLOWED_PEERS = (f"{IDENTITY_URN}admin:", f"{IDENTITY_URN}node:")
# And who may read /metrics besides them: a Prometheus server's certificate.
MONITORS = (*ALLOWED_PEERS, f"{IDENTITY_URN}monitor:")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def auth_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        token = request.app[SESSION].token
        peers = MONITORS if request.path == "/metrics" else ALLOWED_PEERS
        if not (_by_token(request) or (token and _allowed_peer(request, peers))):
            raise Unauthorized("the agent token or an admin's or node's certificate is "
                               "required",
                               hint="Authorization: Bearer <token from token.json>")
        return await handler(request)
    except AgentError as exc:
        return web.json_response(exc.to_json(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response({"status": exc.status, "code": "http_error",
                                  "message": exc.reason}, status=exc.status)


def _by_token(request: web.Request) -> bool:
    token = request.app[SESSION].token
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    return bool(token and scheme.lower() == "bearer"
                and hmac.compare_digest(presented.strip().encode(), token.encode()))


def _peer(request: web.Request) -> str | None:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    return peer_identity(ssl_object.getpeercert() if ssl_object is not None else None)


def _allowed_peer(request: web.Request, peers: tuple[str, ...]) -> bool:
    identity = _peer(request)
    return identity is not None and identity.startswith(peers)


async def status(request: web.Request) -> web.Response:
    session = request.app[SESSION]
    return web.json_response({"version": __version__, "server": session.config.server,
                              "boot_id": session.config.boot_id, **session.status.to_json(),
                              "reconcile": (session.reconciler.status.to_json()
                                            if session.reconciler else None)})


async def inventory(request: web.Request) -> web.Response:
    session = request.app[SESSION]
    if session.inventory is None:
        raise web.HTTPServiceUnavailable(reason="no inventory collected yet")
    return web.json_response(session.inventory)


async def role(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SESSION].role_facts(max_age=0))


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].exposition(),
                        headers={"Content-Type": CONTENT_TYPE})


async def console(request: web.Request) -> web.StreamResponse:
    """``GET /v1/console/<domain>[?force=1][&for=WHO]``: the guest's console on a websocket,
    for the config server (its own certificate: it checks who may, revocations included, and
    names in ``for`` whom it relays for) or the local root (the token)."""
    peer = _peer(request)
    if not (peer == CONSOLE_RELAY or _by_token(request)):
        raise Unauthorized("a guest's console is opened through the config server",
                           hint="configserver instance console NAME")
    asked = "".join(c for c in request.query.get("for", "")[:200] if c.isprintable())
    who = asked if peer == CONSOLE_RELAY and asked else (peer or "the local token")
    websocket = web.WebSocketResponse(heartbeat=30.0, max_msg_size=64 * 1024)
    await websocket.prepare(request)
    await request.app[CONSOLES].serve(websocket, request.match_info["domain"], who,
                                      force=request.query.get("force") in ("1", "true"))
    return websocket


async def migration_released(request: web.Request) -> web.Response:
    """``POST /v1/migrations/<id>/released``: the source of a guest migrating here says it
    stopped the guest's array; only its own certificate may (``roles.migration``)."""
    reconciler = request.app[SESSION].reconciler
    guests = getattr(reconciler.role, "guests", None) if reconciler is not None else None
    moves = getattr(guests, "migrations", None)
    if moves is None:
        raise NotFound("this node receives no migrations")
    if not moves.notify_released(request.match_info["id"], _peer(request)):
        raise NotFound(f"no migration {request.match_info['id']} from this peer comes here")
    return web.json_response({"accepted": True})


def create_local_app(session: AgentSession) -> web.Application:
    app = web.Application(middlewares=[auth_and_errors], client_max_size=64 * 1024)
    app[SESSION] = session
    app[CONSOLES] = Consoles()
    app[METRICS] = AgentMetrics(session)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/inventory", inventory)
    app.router.add_get("/v1/role", role)
    app.router.add_get("/v1/console/{domain}", console)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/migrations/{id}/released", migration_released)
    return app
