"""The web dashboard at ``/``: its pages, its static files, its login and its live feed.

The page is a small static app (``configserver/http/static``: plain JavaScript, no build
step) laid out by a jinja2 template. It draws what ``GET /api/v1/dashboard/events`` pushes
(server-sent events, one ``snapshot`` event whenever the picture changed) and acts through
the same REST API as the CLI, with the same authorization (``auth.py``).

Who sees it: an admin, by client certificate or by the session a login link opened
(``websession``). Anybody else gets the login page, which holds no data. Over plain HTTP,
``/`` redirects to the HTTPS API base.

Routes: ``GET /`` (the dashboard, or the login page), ``GET /login?token=`` (trades a login
link for a session cookie, then redirects to ``/``), ``POST /logout``,
``GET /dashboard/{file}`` (the static files), ``POST /api/v1/dashboard/login`` (an admin
mints a login link), ``GET /api/v1/dashboard`` (one snapshot) and
``GET /api/v1/dashboard/events`` (the live feed).
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import jinja2
from aiohttp import web

from configserver.errors import Forbidden, RateLimited, ServerUnavailable
from configserver.http.appkeys import API_BASE, REGISTRY, WEB_SESSIONS
from configserver.http.auth import IDENTITY, WEB_SESSION, Channel, channel_of, peer_certificate
from configserver.http.dashfeed import DashboardFeed, FeedFull, snapshot
from configserver.http.websession import COOKIE, CSRF_HEADER, WebSessions

STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
# The page runs only its own script and styles and talks only to its own origin.
SECURITY_HEADERS = MappingProxyType({
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
})


@dataclass(frozen=True)
class DashboardAssets:
    templates: jinja2.Environment
    files: Mapping[str, bytes]
    feed: DashboardFeed


ASSETS = web.AppKey("dashboard", DashboardAssets)


def setup(app: web.Application, sessions: WebSessions | None = None) -> None:
    static = importlib.resources.files("configserver.http") / "static"
    templates = jinja2.Environment(
        loader=jinja2.PackageLoader("configserver.http", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined)
    registry = app[REGISTRY]
    feed = DashboardFeed(lambda: snapshot(registry))
    app[ASSETS] = DashboardAssets(
        templates, MappingProxyType({name: (static / name).read_bytes() for name in STATIC}),
        feed)
    app[WEB_SESSIONS] = sessions or WebSessions()

    async def stop_feed(app: web.Application) -> None:
        await feed.close()

    app.on_shutdown.append(stop_feed)  # before the server waits for open requests
    r = app.router
    r.add_get("/", index)
    r.add_get("/login", login)
    r.add_post("/logout", logout)
    r.add_get("/dashboard/{file}", static_file)
    r.add_post("/api/v1/dashboard/login", mint_link)
    r.add_get("/api/v1/dashboard", show_snapshot)
    r.add_get("/api/v1/dashboard/events", events)


def _page(request: web.Request, template: str, *, status: int = 200, **values: object
          ) -> web.Response:
    text = request.app[ASSETS].templates.get_template(template).render(**values)
    return web.Response(text=text, status=status, content_type="text/html",
                        headers=SECURITY_HEADERS)


def _login_page(request: web.Request, message: str = "", status: int = 200) -> web.Response:
    return _page(request, "login.html.j2", status=status, message=message)


async def index(request: web.Request) -> web.StreamResponse:
    if channel_of(request) == Channel.PLAIN:
        base = request.app[API_BASE]
        if not base:
            raise Forbidden("the dashboard is served over HTTPS only")
        raise web.HTTPFound(f"{base}/")
    identity = request.get(IDENTITY)
    if identity is None:
        return _login_page(request)
    if not identity.is_admin:
        return _login_page(request, f"{identity.kind} {identity.name!r} may not use the "
                                    "dashboard: it is for admins", status=403)
    session = request.get(WEB_SESSION)
    return _page(request, "page.html.j2", who=identity.name,
                 csrf=session.csrf if session else "", csrf_header=CSRF_HEADER,
                 signed_in_by="login link" if session else "client certificate")


async def login(request: web.Request) -> web.StreamResponse:
    if channel_of(request) != Channel.TLS:
        raise Forbidden("the dashboard is served over HTTPS only")
    token = request.query.get("token", "")
    redeemed = request.app[WEB_SESSIONS].redeem(token) if token else None
    if redeemed is None:
        return _login_page(request, "This login link is used, expired or unknown: a link "
                                    "opens one session, once. Mint a new one.", status=401)
    session_id, session = redeemed
    response = web.HTTPSeeOther("/", headers=SECURITY_HEADERS)
    response.set_cookie(COOKIE, session_id, httponly=True, secure=True, samesite="Strict",
                        path="/", max_age=int(session.expires - session.created))
    raise response


async def logout(request: web.Request) -> web.Response:
    request.app[WEB_SESSIONS].end(request.cookies.get(COOKIE) if request.get(WEB_SESSION)
                                  else None)
    response = web.Response(status=204, headers=SECURITY_HEADERS)
    response.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    return response


async def static_file(request: web.Request) -> web.Response:
    name = request.match_info["file"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    return web.Response(body=request.app[ASSETS].files[name], content_type=STATIC[name],
                        headers={"X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "no-cache"})


async def mint_link(request: web.Request) -> web.Response:
    """A single-use login link for the calling admin (``configserver dashboard login``)."""
    identity = request[IDENTITY]
    if request.get(WEB_SESSION) is not None:
        raise Forbidden("a dashboard session cannot mint login links",
                        hint="use a client certificate or the server's unix socket")
    certificate = peer_certificate(request)
    token, expires = request.app[WEB_SESSIONS].mint_link(
        identity, certificate.serial_number if certificate else None)
    base = request.app[API_BASE] or f"https://{request.host}"
    return web.json_response({
        "url": f"{base}/login?token={token}", "for": identity.name,
        "expires": expires,
        "expires_at": datetime.datetime.fromtimestamp(expires, datetime.UTC).isoformat()},
        status=201)


async def show_snapshot(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(snapshot, request.app[REGISTRY])
    return web.json_response(body)


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``snapshot`` (the whole picture, one JSON line) first, then
    ``patch`` (``dashfeed.changes``) whenever the picture changed."""
    feed = request.app[ASSETS].feed
    stream = feed.stream()
    try:
        first = await anext(stream)
    except FeedFull as exc:
        raise RateLimited(str(exc), hint="close a dashboard page") from None
    except StopAsyncIteration:
        raise ServerUnavailable("the server is shutting down") from None
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        item = first
        while True:
            if item is None:
                await response.write(b": keepalive\n\n")
            else:
                event, data = item
                await response.write(f"event: {event}\ndata: {data}\n\n".encode())
            item = await anext(stream)
    except (ConnectionResetError, StopAsyncIteration):
        pass
    finally:
        await stream.aclose()
    return response


__all__ = ["ASSETS", "setup"]
