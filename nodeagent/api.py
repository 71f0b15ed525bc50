"""The agent's local API: ``/v1/status``, ``/v1/inventory``, ``/v1/role``.

Every request must carry ``Authorization: Bearer <agent token>``, the token the config server
issued for this boot (also in ``state_dir/token.json``, readable by root only). Before the agent
holds a token every request is refused.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from nodeagent import __version__
from nodeagent.errors import AgentError, Unauthorized
from nodeagent.session import AgentSession

log = logging.getLogger(__name__)

SESSION = web.AppKey("session", AgentSession)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def auth_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        token = request.app[SESSION].token
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if (not token or scheme.lower() != "bearer"
                or not hmac.compare_digest(presented.strip().encode(), token.encode())):
            raise Unauthorized("the agent token is required",
                               hint="Authorization: Bearer <token from token.json>")
        return await handler(request)
    except AgentError as exc:
        return web.json_response(exc.to_json(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response({"status": exc.status, "code": "http_error",
                                  "message": exc.reason}, status=exc.status)


async def status(request: web.Request) -> web.Response:
    session = request.app[SESSION]
    return web.json_response({"version": __version__, "server": session.config.server,
                              "boot_id": session.config.boot_id, **session.status.to_json()})


async def inventory(request: web.Request) -> web.Response:
    session = request.app[SESSION]
    if session.inventory is None:
        raise web.HTTPServiceUnavailable(reason="no inventory collected yet")
    return web.json_response(session.inventory)


async def role(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SESSION].role_facts(max_age=0))


def create_local_app(session: AgentSession) -> web.Application:
    app = web.Application(middlewares=[auth_and_errors], client_max_size=64 * 1024)
    app[SESSION] = session
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/inventory", inventory)
    app.router.add_get("/v1/role", role)
    return app
