"""Builds the config server's aiohttp application: REST API, HTTP boot and agent API."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from configserver.cloud.notify import GenerationNotifier
from configserver.config import ServerConfig
from configserver.errors import NetbootError
from configserver.http import (
    agentapi,
    api,
    boot,
    consoleapi,
    dashboard,
    instancesapi,
    leaseapi,
    limits,
    metricsapi,
    usersapi,
    volumesapi,
    workapi,
)
from configserver.http.appkeys import (
    API_BASE,
    AUTHORITY,
    CATALOG,
    CLOUD,
    CONFIG,
    REGISTRY,
    REVOCATIONS,
    SECRET_KEY,
)
from configserver.http.auth import auth_middleware
from configserver.images import ImageCatalog
from configserver.pki import CertificateAuthority, Revocations
from configserver.registry import Registry

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error as JSON ``{status, code, message[, hint]}``."""
    try:
        return await handler(request)
    except NetbootError as exc:
        return _json_error(exc.status, exc.to_json())
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status, "http_error")
        return _json_error(exc.status, {"status": exc.status, "code": code,
                                        "message": exc.reason})
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _json_error(400, {"status": 400, "code": "invalid_json",
                                 "message": f"request body is not valid JSON: {exc}"})
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _json_error(500, {"status": 500, "code": "internal_error",
                                 "message": "internal error (see the server's log)"})


def _json_error(status: int, body: dict[str, object]) -> web.Response:
    return web.json_response(body, status=status)


def create_app(config: ServerConfig, registry: Registry, authority: CertificateAuthority, *,
               api_base: str = "", secret_key: bytes | None = None) -> web.Application:
    """The whole HTTP side of the server; sockets and other services are the caller's.

    One application serves every listener (plain HTTP, HTTPS, the unix socket); the
    ``auth_middleware`` tells them apart. ``api_base`` is the HTTPS URL nodes use.
    ``secret_key`` signs boot tickets; without one (tests) a random key lives as long as the
    application.
    """
    app = web.Application(middlewares=[limits.body_deadline, metricsapi.count_requests,
                                       error_middleware, auth_middleware],
                          client_max_size=16 * 1024 * 1024)
    app[CONFIG] = config
    app[REGISTRY] = registry
    app[AUTHORITY] = authority
    app[API_BASE] = api_base.rstrip("/")
    app[REVOCATIONS] = Revocations(registry.revoked_certificates(), clock=authority.now)
    app[SECRET_KEY] = secret_key or secrets.token_bytes(32)
    app[CATALOG] = ImageCatalog(config.images_dir)
    app[CLOUD] = GenerationNotifier(registry.cloud_generation())
    metricsapi.setup(app)
    leaseapi.setup_routes(app)  # before api's /nodes/{mac}
    usersapi.setup_routes(app)
    api.setup_routes(app)
    boot.setup_routes(app)
    agentapi.setup_agent_api(app)
    volumesapi.setup_routes(app)
    instancesapi.setup_routes(app)
    consoleapi.setup_routes(app)
    workapi.setup_routes(app)
    dashboard.setup(app)
    return app
