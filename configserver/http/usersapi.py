"""Users and the CA over HTTP: ``/api/v1/users`` (admins), ``whoami`` (anyone
authenticated), and the public CA certificate and CRL (``/boot/ca.pem``, ``/boot/crl.pem``,
``/api/v1/crl``).

A user's key never reaches the server: the client sends a CSR and gets the certificate back.
Revocation takes effect for the next request (the in-memory set is replaced after the commit).
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

from aiohttp import web

from configserver.errors import Conflict, InvalidRequest, NotFound
from configserver.http.appkeys import AUTHORITY, REGISTRY, REVOCATIONS
from configserver.http.auth import IDENTITY, channel_of
from configserver.pki import Identity

USER_DAYS = 90
MAX_USER_DAYS = 825
PEM = "application/x-pem-file"


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/boot/ca.pem", ca_certificate)
    r.add_get("/boot/crl.pem", crl)
    r.add_get("/api/v1/crl", crl)
    r.add_get("/api/v1/whoami", whoami)
    r.add_get("/api/v1/users", list_users)
    r.add_post("/api/v1/users", add_user)
    r.add_get("/api/v1/users/{name}", show_user)
    r.add_post("/api/v1/users/{name}/revoke", revoke_user)


async def ca_certificate(request: web.Request) -> web.Response:
    return web.Response(body=request.app[AUTHORITY].certificate_pem, content_type=PEM)


async def crl(request: web.Request) -> web.Response:
    revoked = request.app[REVOCATIONS].revoked
    return web.Response(body=request.app[AUTHORITY].crl_pem(revoked), content_type=PEM)


async def whoami(request: web.Request) -> web.Response:
    identity = request[IDENTITY]
    return web.json_response({**identity.to_json(), "channel": str(channel_of(request))})


async def list_users(request: web.Request) -> web.Response:
    users = await asyncio.to_thread(request.app[REGISTRY].users)
    return web.json_response({"users": [u.to_json() for u in users]})


async def show_user(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    user = await asyncio.to_thread(request.app[REGISTRY].user, name)
    if user is None:
        raise NotFound(f"no user {name!r}", hint="see 'configserver user list'")
    return web.json_response(user.to_json())


def _identity(data: dict[str, Any]) -> Identity:
    kind, name, tenant = data.get("kind"), data.get("name"), data.get("tenant")
    if kind not in ("admin", "tenant", "monitor"):
        raise InvalidRequest("kind must be 'admin', 'tenant' or 'monitor'")
    if not isinstance(name, str) or (tenant is not None and not isinstance(tenant, str)):
        raise InvalidRequest("'name' (and 'tenant') must be strings")
    return Identity(kind, name, tenant=tenant if kind == "tenant" else None)


async def add_user(request: web.Request) -> web.Response:
    """``{"name", "kind": "admin"|"tenant"|"monitor", "tenant"?, "csr": PEM, "days"?}`` -> 201."""
    data = await request.json()
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    unknown = set(data) - {"name", "kind", "tenant", "csr", "days"}
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(sorted(unknown))}")
    identity = _identity(data)
    days = data.get("days", USER_DAYS)
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_USER_DAYS:
        raise InvalidRequest(f"days must be a whole number from 1 to {MAX_USER_DAYS}")
    csr = data.get("csr")
    if not isinstance(csr, str):
        raise InvalidRequest("'csr' must be a PEM certificate request")
    registry, authority = request.app[REGISTRY], request.app[AUTHORITY]
    existing = await asyncio.to_thread(registry.user, identity.name)
    if existing is not None and existing.revoked is None:
        raise Conflict(f"user {identity.name!r} exists",
                       hint=f"revoke it first ('configserver user revoke {identity.name}')")
    issued = authority.sign_csr(csr.encode(), identity, datetime.timedelta(days=days))
    user = await asyncio.to_thread(registry.add_user, identity.name, identity.kind,
                                   identity.tenant, issued.serial, issued.not_after)
    return web.json_response({"user": user.to_json(), "certificate": issued.pem.decode(),
                              "ca": authority.certificate_pem.decode(),
                              "not_after": issued.not_after}, status=201)


async def revoke_user(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    user = await asyncio.to_thread(registry.revoke_user, request.match_info["name"])
    request.app[REVOCATIONS].replace(await asyncio.to_thread(registry.revoked_certificates))
    return web.json_response(user.to_json())
