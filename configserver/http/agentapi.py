"""The config server's side of the node agent protocol: lookup, heartbeat, inventory.

Token rules (after Ironic's agent token):

* a lookup for a new boot identifier issues a fresh random token, stored only as its SHA-256;
* a second lookup for the same boot identifier succeeds but carries ``"token": null``, unless it
  carries the same secret ``nonce`` as the lookup that got the token: then the same token is
  sent again (the first answer may have been lost on the way; knowing the nonce is as good as
  holding the token, since the token is ``HMAC(server key, mac|boot_id|nonce)``);
* every heartbeat and inventory push must carry ``Authorization: Bearer <token>`` together with
  the node's MAC and boot identifier in the body; anything else is 401. The token alone names
  the session, so it is checked before any byte of the body is read (and before a client
  sending ``Expect: 100-continue`` sends it), like the body's declared size;
* a lookup with a new boot identifier (a reboot) replaces the old session only if it carries
  this boot's ticket (``configserver.http.tickets``: the boot script fetched after the old
  agent fell silent) and the old agent has stopped heartbeating; fetching a boot script or a
  DHCP exchange never moves a node's session;
* a lookup for an unknown MAC and one refused for any other reason get the same 404 answer;
* lookups are rate-limited per source address by an in-memory token bucket.

Enrollment (``POST /api/v1/agent/enroll``): the token of this boot, or the node's current
client certificate (mTLS, to renew), buys a short-lived certificate for a CSR whose key the
agent made in RAM. The certificate names the node and this boot (``Identity("node", mac,
boot_id=...)``); from then on heartbeats and inventories may authenticate with it instead of
the token, as long as its boot is the node's current agent session.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from configserver.errors import InvalidMac, InvalidRequest, NotFound, RateLimited, Unauthorized
from configserver.http import limits, metricsapi
from configserver.http.api import bearer_token
from configserver.http.appkeys import AUTHORITY, CLOUD, CONFIG, REGISTRY, SECRET_KEY
from configserver.http.auth import IDENTITY
from configserver.http.tickets import ticket_time
from configserver.model import Node, NodeState, normalize_mac
from configserver.pki import Identity
from configserver.registry import AgentSession

log = logging.getLogger(__name__)

_BOOT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_NONCE = re.compile(r"^[A-Za-z0-9_-]{22,128}$")
_TICKET_FIELD = re.compile(r"^[0-9a-f.A-Za-z_-]{1,64}$")
MAX_LOOKUP_MACS = 64
MAX_BODY_BYTES = 64 * 1024  # lookups and heartbeats
MAX_INVENTORY_BYTES = 4 * 1024 * 1024
REFUSED = "no node matches this lookup"
NODE_CERT_LIFETIME = datetime.timedelta(hours=24)
MAX_CSR_BYTES = 16 * 1024


class LookupRateLimiter:
    """A token bucket per source address: ``burst`` lookups at once, ``rate`` per second after.

    Buckets idle long enough to be full again are forgotten, so memory stays bounded by the
    number of recently active sources.
    """

    def __init__(self, rate: float = 20.0, burst: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def acquire(self, source: str) -> float:
        """Take one token for ``source``: 0.0 if allowed, else seconds until one is due."""
        now = self._clock()
        tokens, stamp = self._buckets.get(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        if tokens >= 1.0:
            self._buckets[source] = (tokens - 1.0, now)
            return 0.0
        self._buckets[source] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def forget_idle(self) -> None:
        now = self._clock()
        full_after = self.burst / self.rate
        for source, (_, stamp) in list(self._buckets.items()):
            if now - stamp > full_after:
                del self._buckets[source]


@dataclass
class AgentApiState:
    """Per-application objects of the agent API."""

    limiter: LookupRateLimiter = field(default_factory=LookupRateLimiter)


AGENT_API = web.AppKey("agent_api", AgentApiState)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def derive_token(key: bytes, mac: str, boot_id: str, nonce: str) -> str:
    """The token for one lookup nonce: only this server can compute it, the same every time."""
    digest = hmac.new(key, f"{mac}|{boot_id}|{nonce}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _token_key(app: web.Application) -> bytes:
    """The key tokens are derived with: from the CA's key, so it survives restarts."""
    return app[AUTHORITY].derive_secret("netboot agent token key")



def heartbeat_is_fresh(node: Node, heartbeat_interval: float, now: float) -> bool:
    """Whether the node's current agent is still heartbeating: a beat within two and a half
    intervals (a lost answer and jitter do not count as silence)."""
    silent_after = 2.5 * heartbeat_interval + 1.0
    return node.last_heartbeat is not None and now - node.last_heartbeat < silent_after


def takeover_refusal(node: Node, session: AgentSession, ticket_issued: float | None,
                     *, heartbeat_interval: float, ticket_lifetime: float,
                     now: float) -> str | None:
    """Why a lookup under a new boot may not replace the node's agent session (None: it may).

    A new boot needs the boot ticket of a script fetched after the current session began and
    after its agent last heartbeated, and never replaces an agent that is heartbeating.
    """
    if heartbeat_is_fresh(node, heartbeat_interval, now):
        return "the node's agent is heartbeating"
    if ticket_issued is None:
        return "no valid boot ticket"
    if ticket_issued < now - ticket_lifetime or ticket_issued > now + 60.0:
        return "the boot ticket has expired"
    if ticket_issued <= max(session.issued, node.last_heartbeat or 0.0):
        return "the boot ticket is older than the current agent session"
    return None


def setup_agent_api(app: web.Application) -> None:
    """Add the agent routes and the background task that marks silent nodes lost."""
    if AGENT_API not in app:
        app[AGENT_API] = AgentApiState()
    app.router.add_post("/api/v1/agent/lookup", lookup,
                        expect_handler=limits.expect_handler(MAX_BODY_BYTES))
    app.router.add_post("/api/v1/agent/heartbeat", heartbeat,
                        expect_handler=limits.expect_handler(MAX_BODY_BYTES, _require_session))
    app.router.add_post("/api/v1/agent/inventory", push_inventory,
                        expect_handler=limits.expect_handler(MAX_INVENTORY_BYTES,
                                                             _require_session))
    app.router.add_post("/api/v1/agent/enroll", enroll,
                        expect_handler=limits.expect_handler(MAX_BODY_BYTES, _require_session))
    app.cleanup_ctx.append(_lost_node_sweeper)


async def _json_body(request: web.Request, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    body = await limits.read_body(request, limit)
    try:
        data = json.loads(body or b"{}")
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


def _boot_id(data: dict[str, Any]) -> str:
    boot_id = data.get("boot_id")
    if not isinstance(boot_id, str) or not _BOOT_ID.match(boot_id):
        raise InvalidRequest("boot_id must be a string of letters, digits and ._:-")
    return boot_id


def _node_json(node: Node) -> dict[str, Any]:
    return {"mac": node.mac, "hostname": node.hostname, "role": node.role}


async def lookup(request: web.Request) -> web.Response:
    """``POST /api/v1/agent/lookup`` ``{"macs": [...], "boot_id": "...", "nonce": "..."}``."""
    state = request.app[AGENT_API]
    source = request.remote or "unknown"
    wait = state.limiter.acquire(source)
    if wait > 0:
        error = RateLimited(f"too many lookups from {source}; retry in {wait:.1f}s")
        return web.json_response(error.to_json(), status=error.status,
                                 headers={"Retry-After": str(max(1, round(wait + 0.5)))})
    data = await _json_body(request)
    macs = data.get("macs")
    if not isinstance(macs, list) or not macs or len(macs) > MAX_LOOKUP_MACS:
        raise InvalidRequest(f"macs must be a list of 1 to {MAX_LOOKUP_MACS} MAC addresses")
    try:
        normalized = list(dict.fromkeys(normalize_mac(m) for m in macs))
    except InvalidMac as exc:
        raise InvalidRequest(exc.message) from None
    boot_id = _boot_id(data)
    nonce = data.get("nonce")
    if nonce is not None and (not isinstance(nonce, str) or not _NONCE.match(nonce)):
        raise InvalidRequest("nonce must be 22 to 128 URL-safe base64 characters")
    registry = request.app[REGISTRY]
    config = request.app[CONFIG]

    matches: dict[str, Node] = {}
    for mac in normalized:
        node = registry.lookup(mac)
        if node is not None:
            matches[node.mac] = node
    if len(matches) != 1:
        log.info("agent lookup refused from %s for %s: %d matching nodes", source,
                 ",".join(normalized), len(matches))
        raise NotFound(REFUSED)
    node = next(iter(matches.values()))
    if node.state == NodeState.PENDING or not node.role:
        log.info("agent lookup refused from %s for %s: node is %s", source, node.mac,
                 node.state)
        raise NotFound(REFUSED)

    ticket = data.get("ticket")
    if ticket is not None and (not isinstance(ticket, str) or not _TICKET_FIELD.fullmatch(ticket)):
        raise InvalidRequest("ticket must be the netboot.ticket of this boot's command line")

    session = registry.agent_session(node.mac)
    derived = derive_token(_token_key(request.app), node.mac, boot_id, nonce) if nonce else None
    token: str | None = None
    refusal = None
    if session is not None and session.boot_id != boot_id:
        issued = ticket_time(request.app[SECRET_KEY], node.mac, ticket) if ticket else None
        refusal = takeover_refusal(node, session, issued,
                                   heartbeat_interval=config.heartbeat_interval,
                                   ticket_lifetime=config.boot_ticket_lifetime,
                                   now=time.time())
    if refusal is not None:
        registry.record_event(node.mac, "agent.lookup", {"boot_id": boot_id,
                                                         "token_issued": False,
                                                         "refused": refusal})
        log.warning("agent lookup from %s for %s with a new boot %s refused: %s (current "
                    "boot %s)", source, node.mac, boot_id, refusal,
                    session.boot_id if session else None)
    elif session is None or session.boot_id != boot_id:
        token = derived or secrets.token_urlsafe(32)
        # Committed before the answer: the agent's first heartbeat must find its session.
        await asyncio.to_thread(registry.start_agent_session, node.mac, boot_id,
                                hash_token(token))
        log.info("agent token issued to %s for boot %s (from %s)", node.mac, boot_id, source)
    elif derived and session.token_hash and hmac.compare_digest(hash_token(derived),
                                                                session.token_hash):
        token = derived
        registry.record_event(node.mac, "agent.lookup", {"boot_id": boot_id,
                                                         "token_issued": False,
                                                         "token_resent": True})
        log.info("agent token sent again to %s for boot %s: same nonce", node.mac, boot_id)
    else:
        registry.record_event(node.mac, "agent.lookup", {"boot_id": boot_id,
                                                         "token_issued": False})
        log.info("agent lookup for %s boot %s again: no new token", node.mac, boot_id)
    answer = {"node": _node_json(node), "heartbeat_interval": config.heartbeat_interval,
              "token": token}
    if refusal is not None:
        answer["refused"] = refusal
    return web.json_response(answer)


_SESSION = web.RequestKey("agent_session", AgentSession)
_REFUSED_TOKEN = "invalid or missing agent token"
_REFUSED_HINT = "look the node up again to get a token for this boot"


async def _require_session(request: web.Request) -> None:
    _session(request)


def _session(request: web.Request) -> AgentSession:
    """The agent session the request proves, else 401: the node's client certificate for its
    current boot (verified by TLS), or that boot's agent token. From the headers alone, so
    before any byte of the body is read."""
    if _SESSION in request:
        return request[_SESSION]
    identity = request.get(IDENTITY)
    registry = request.app[REGISTRY]
    if identity is not None and identity.kind == "node":
        session = registry.agent_session(identity.name)
        if session is None or session.mac != identity.name or session.boot_id != identity.boot_id:
            raise Unauthorized("this node certificate is not for the node's current boot",
                               hint="enroll again with this boot's agent token")
    else:
        presented = bearer_token(request)
        session = (registry.agent_session_by_token(hash_token(presented))
                   if presented is not None else None)
        if session is None:
            raise Unauthorized(_REFUSED_TOKEN, hint=_REFUSED_HINT)
    request[_SESSION] = session
    return session


def _authenticate(request: web.Request, session: AgentSession, data: dict[str, Any]) -> Node:
    """The session's node, if the body names it (any of its MACs) and the session's boot."""
    refused = Unauthorized(_REFUSED_TOKEN, hint=_REFUSED_HINT)
    try:
        mac = normalize_mac(data.get("mac", ""))
        boot_id = _boot_id(data)
    except InvalidRequest:
        raise refused from None
    node = request.app[REGISTRY].lookup(mac)
    if node is None or node.mac != session.mac or boot_id != session.boot_id:
        raise refused
    return node


async def enroll(request: web.Request) -> web.Response:
    """``POST /api/v1/agent/enroll`` ``{"mac", "boot_id", "csr"}`` + token or node certificate.

    Answers ``{"certificate", "ca", "not_after", "renew_after"}``. The certificate names the
    node's registered addresses and hostname and the address the request came from.
    """
    session = _session(request)
    data = await _json_body(request)
    node = _authenticate(request, session, data)
    csr = data.get("csr")
    if not isinstance(csr, str) or len(csr) > MAX_CSR_BYTES:
        raise InvalidRequest("csr must be a PEM certificate request")
    boot_id = _boot_id(data)
    sans = [node.hostname or "", *(nic.ip or "" for nic in node.nics), request.remote or ""]
    authority = request.app[AUTHORITY]
    issued = authority.sign_csr(csr.encode(), Identity("node", node.mac, boot_id=boot_id),
                                NODE_CERT_LIFETIME, sans=[n for n in sans if n])
    lifetime = NODE_CERT_LIFETIME.total_seconds()
    identity = request.get(IDENTITY)
    renewal = identity is not None and identity.kind == "node"
    request.app[REGISTRY].record_event(node.mac, "agent.enroll", {
        "boot_id": boot_id, "serial": f"{issued.serial:x}", "not_after": issued.not_after,
        "renewal": renewal})
    log.info("node certificate %x issued to %s for boot %s (%s, from %s)", issued.serial,
             node.mac, boot_id, "renewal" if renewal else "token", request.remote)
    return web.json_response({"certificate": issued.pem.decode(),
                              "ca": authority.certificate_pem.decode(),
                              "not_after": issued.not_after,
                              "renew_after": issued.not_after - lifetime / 3})


async def heartbeat(request: web.Request) -> web.Response:
    """``POST /api/v1/agent/heartbeat`` ``{"mac", "boot_id", "status": {...}}`` + token."""
    session = _session(request)
    data = await _json_body(request)
    node = _authenticate(request, session, data)
    status = data.get("status", {})
    if not isinstance(status, dict):
        raise InvalidRequest("status must be a JSON object")
    status = {**status, "address": request.remote}  # where its API is (consoles)
    updated = await asyncio.to_thread(request.app[REGISTRY].record_heartbeat, node.mac,
                                      status)
    if node.state != NodeState.READY and updated.state == NodeState.READY:
        await metricsapi.observe_boot(request.app, node.mac)
    answer: dict[str, Any] = {"state": str(updated.state),
                              "heartbeat_interval": request.app[CONFIG].heartbeat_interval}
    if updated.role == "dom0":
        answer["self_fence_after"] = request.app[CONFIG].self_fence_after
    return web.json_response(answer)


async def push_inventory(request: web.Request) -> web.Response:
    """``POST /api/v1/agent/inventory`` ``{"mac", "boot_id", "inventory": {...}}`` + token."""
    session = _session(request)
    data = await _json_body(request, MAX_INVENTORY_BYTES)
    node = _authenticate(request, session, data)
    inventory = data.get("inventory")
    if not isinstance(inventory, dict):
        raise InvalidRequest("inventory must be a JSON object")
    await asyncio.to_thread(request.app[REGISTRY].set_inventory, node.mac, inventory)
    log.info("inventory of %s updated (%d disks, %d nics)", node.mac,
             len(inventory.get("disks") or []), len(inventory.get("nics") or []))
    return web.json_response({"stored": True})


async def _lost_node_sweeper(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_sweep_lost_nodes(app), name="agent-lost-sweeper")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _sweep_lost_nodes(app: web.Application) -> None:
    config = app[CONFIG]
    period = max(0.5, min(config.heartbeat_interval, config.lost_after / 3))
    started = time.monotonic()
    while True:
        await asyncio.sleep(period)
        if time.monotonic() - started < config.lost_after:
            # Heard by nobody while this server was down is not silence: a node is lost only
            # after lost_after with the server up (a restart after a long outage fences no
            # dom0 that heartbeats again within it).
            continue
        try:
            lost = await asyncio.to_thread(app[REGISTRY].mark_lost,
                                           time.time() - config.lost_after)
        except Exception:
            log.exception("marking silent nodes lost failed")
            continue
        app[AGENT_API].limiter.forget_idle()
        for mac in lost:
            log.warning("node %s is lost: no heartbeat for %.0fs", mac, config.lost_after)
        if not config.cloud.failover:
            continue
        try:  # every pass: a fence a crash cut short is taken up again
            generation = await asyncio.to_thread(app[REGISTRY].fail_over_lost)
        except Exception:
            log.exception("failing over the instances of lost dom0s failed")
            continue
        if generation is not None and CLOUD in app:
            app[CLOUD].publish(generation)
