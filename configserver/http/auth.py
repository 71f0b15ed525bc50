"""Authentication and authorization of the API, in one place: ``auth_middleware``.

Who is calling follows from how the request arrived, nothing else:

* over TLS with a client certificate the TLS layer verified against our CA: the identity that
  certificate names (``identity_of``), unless it is revoked or expired;
* over the unix socket in the state directory (mode 0600): the local admin;
* over TLS without a certificate, with the dashboard's session cookie: the admin who opened
  that session (``websession``); a request that changes something must then carry the
  session's CSRF token in a header too, and a session ends with its minting certificate;
* otherwise nobody.

What each identity may do (``required_access``): admins everything; tenants only their own
objects (volumes, instances: the handlers show a tenant only its own) and ``whoami``; monitors
(a Prometheus server) only ``/metrics`` and the scrape targets; nodes only the agent
endpoints, whose handlers check which node; nobody only the health check, the CRL and the
agent endpoints (lookup and enroll come before a node has a certificate; heartbeat and
inventory still take the agent token). Plain HTTP serves what firmware fetches and refuses
the API, pointing to HTTPS.
"""

from __future__ import annotations

import enum
import logging
import socket
import urllib.parse
from collections.abc import Awaitable, Callable

from aiohttp import web
from cryptography import x509

from configserver.errors import Forbidden, HttpsRequired, Unauthorized
from configserver.http.appkeys import API_BASE, CONFIG, REVOCATIONS, WEB_SESSIONS
from configserver.http.websession import COOKIE, CSRF_HEADER, Session
from configserver.pki.identity import Identity, identity_of

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IDENTITY = web.RequestKey("identity", Identity)
# Set when the identity came from the dashboard's session cookie.
WEB_SESSION = web.RequestKey("web_session", Session)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOCAL_ADMIN = Identity("admin", "local")


class Channel(enum.StrEnum):
    PLAIN = "http"
    TLS = "https"
    LOCAL = "unix"


class Access(enum.Enum):
    PUBLIC = "anyone"
    AUTHENTICATED = "any identity"
    AGENT = "nodes (the handler checks which)"
    ADMIN = "admins"
    OWNER = "admins and tenants (the handler shows a tenant only its own objects)"
    MONITOR = "admins and monitors"


_PUBLIC = {("GET", "/api/v1/health"), ("GET", "/api/v1/crl"),
           ("POST", "/api/v1/agent/lookup")}
_AGENT = {("POST", "/api/v1/agent/enroll"), ("POST", "/api/v1/agent/heartbeat"),
          ("POST", "/api/v1/agent/inventory"), ("GET", "/api/v1/agent/work"),
          ("POST", "/api/v1/agent/report"), ("POST", "/api/v1/agent/claim")}
_OWNER = {("GET", "/api/v1/volumes"), ("POST", "/api/v1/volumes"),
          ("GET", "/api/v1/volumes/{name}"), ("DELETE", "/api/v1/volumes/{name}"),
          ("POST", "/api/v1/volumes/{name}/attach"), ("POST", "/api/v1/volumes/{name}/detach"),
          ("GET", "/api/v1/instances"), ("POST", "/api/v1/instances"),
          ("GET", "/api/v1/instances/{name}"), ("DELETE", "/api/v1/instances/{name}"),
          ("POST", "/api/v1/instances/{name}/start"), ("POST", "/api/v1/instances/{name}/stop"),
          ("POST", "/api/v1/instances/{name}/reboot"), ("GET", "/api/v1/instances/{name}/usage"),
          ("PATCH", "/api/v1/instances/{name}"), ("GET", "/api/v1/instances/{name}/console")}
_AUTHENTICATED = {("GET", "/api/v1/whoami")}
_MONITOR = {("GET", "/metrics"), ("GET", "/api/v1/prometheus/targets")}
# Outside /api/, what needs an identity all the same (the rest there is what firmware fetches,
# and the dashboard's pages, whose handlers show their data to an admin only).
GUARDED = frozenset({"/metrics"})


def required_access(method: str, path: str) -> Access:
    """Who may call ``method path`` (an /api/v1 path); unknown routes need an admin."""
    key = (method, path)
    if key in _PUBLIC:
        return Access.PUBLIC
    if key in _AGENT:
        return Access.AGENT
    if key in _AUTHENTICATED:
        return Access.AUTHENTICATED
    if key in _OWNER:
        return Access.OWNER
    if key in _MONITOR:
        return Access.MONITOR
    return Access.ADMIN


def channel_of(request: web.Request) -> Channel:
    transport = request.transport
    if transport is None:
        return Channel.PLAIN
    if transport.get_extra_info("sslcontext") is not None:
        return Channel.TLS
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        return Channel.LOCAL
    return Channel.PLAIN


def peer_certificate(request: web.Request) -> x509.Certificate | None:
    """The client certificate the TLS layer verified, or None without one."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return x509.load_der_x509_certificate(der) if der else None


def peer_identity(request: web.Request) -> Identity | None:
    """The identity of the verified client certificate, or None without one."""
    certificate = peer_certificate(request)
    if certificate is None:
        return None
    if certificate.serial_number in request.app[REVOCATIONS].serials:
        raise Unauthorized("this client certificate has been revoked",
                           hint="ask an admin for a new one (configserver user add)")
    if certificate.not_valid_after_utc.timestamp() < request.app[REVOCATIONS].clock():
        raise Unauthorized("this client certificate has expired",
                           hint="ask an admin for a new one (configserver user add)")
    return identity_of(certificate)


def cookie_identity(request: web.Request) -> Identity | None:
    """The admin of the dashboard session the cookie names, or None (no or unknown cookie).

    A request that changes something needs the session's CSRF token in ``X-CSRF-Token``."""
    sessions = request.app[WEB_SESSIONS]
    session = sessions.session(request.cookies.get(COOKIE))
    if session is None:
        return None
    if session.serial is not None and session.serial in request.app[REVOCATIONS].serials:
        sessions.end_revoked({session.serial})
        return None
    if request.method not in SAFE_METHODS and not session.csrf_matches(
            request.headers.get(CSRF_HEADER)):
        raise Forbidden("this request carries the dashboard's session cookie but not its "
                        f"CSRF token ({CSRF_HEADER})",
                        hint="send requests from the dashboard's page, or use a client "
                             "certificate")
    request[WEB_SESSION] = session
    return session.identity


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Set ``request[IDENTITY]`` (or leave it unset), then allow or refuse the route."""
    channel = channel_of(request)
    if channel == Channel.LOCAL:
        identity: Identity | None = LOCAL_ADMIN
    elif channel == Channel.TLS:
        identity = peer_identity(request) or cookie_identity(request)
    else:
        identity = None
    if identity is not None:
        request[IDENTITY] = identity
    origin = request.headers.get("Origin")
    if (request.method not in SAFE_METHODS and origin is not None
            and urllib.parse.urlsplit(origin).netloc != request.host):
        # A browser says where a page came from: another site's page may not act here with
        # this browser's certificate or cookie.
        raise Forbidden(f"a request from another site ({origin[:100]}) was refused",
                        hint="use the dashboard's own page, or a client without Origin")
    if not request.path.startswith("/api/") and request.path not in GUARDED:
        return await handler(request)  # what firmware fetches: public, on every listener
    route = request.match_info.route.resource
    path = route.canonical if route is not None else request.path
    access = required_access(request.method, path)
    # Until the agent speaks HTTPS, its endpoints stay on plain HTTP too (with the token).
    transitional = (request.app[CONFIG].http.plain_agent_api
                    and path.startswith("/api/v1/agent/"))
    if channel == Channel.PLAIN and not transitional:
        base = request.app[API_BASE] or "https://<server>:8443"
        raise HttpsRequired(f"the API is served over HTTPS only: {base}{request.path}",
                            hint="plain HTTP serves only /boot, /ipxe and /images; "
                                 "see docs/security.md")
    if access in (Access.PUBLIC, Access.AGENT):
        return await handler(request)
    if identity is None:
        raise Unauthorized("this request needs a client certificate",
                           hint="e.g. curl --cert NAME.pem --key NAME.key --cacert ca.pem "
                                "(configserver user add NAME); see docs/security.md")
    if access == Access.OWNER and identity.kind not in ("admin", "tenant"):
        raise Forbidden(f"{identity.kind} {identity.name!r} may not {request.method} "
                        f"{request.path}", hint="this needs an admin or tenant certificate")
    if access == Access.MONITOR and identity.kind not in ("admin", "monitor"):
        raise Forbidden(f"{identity.kind} {identity.name!r} may not {request.method} "
                        f"{request.path}", hint="this needs an admin or monitor certificate "
                                                "(configserver user add NAME --monitor)")
    if access == Access.ADMIN and not identity.is_admin:
        raise Forbidden(f"{identity.kind} {identity.name!r} may not {request.method} "
                        f"{request.path}", hint="this needs an admin certificate")
    return await handler(request)
