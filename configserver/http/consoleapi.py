"""A guest's console through the config server (``GET /api/v1/instances/NAME/console``).

A websocket from the client (``configserver instance console``) is relayed to the agent of
the dom0 that holds the instance's claim now (``/v1/console/<domain>`` on its HTTPS API, with
the server's own admin client certificate; the agent's certificate must name that node in
the boot the registry knows as its current agent session). The
frames pass unchanged both ways: binary frames carry the console's bytes, text frames JSON
control messages (``attached``, ``detached``, ``error``). Errors found here, before any agent
is called, are such an ``error`` frame too, so the client reads every failure the same way.

Who may: admins, and a tenant for its own instances (``auth.py``). Each attach and detach is
logged with who asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import urllib.parse
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from configserver.cloud.instances import Instance
from configserver.errors import Conflict, NetbootError, NotFound, ServerUnavailable
from configserver.http.appkeys import AUTHORITY, CONFIG, REGISTRY
from configserver.http.auth import IDENTITY
from configserver.http.instancesapi import find_instance
from configserver.model import Node
from configserver.pki.identity import Identity
from configserver.pki.tls import agent_client_context, ensure_agent_client_certificate

log = logging.getLogger(__name__)

HEARTBEAT = 30.0
CONNECT_TIMEOUT = 15.0
RECHECK = 3600.0  # seconds between looks at the client certificate's age
MAX_FRAME = 64 * 1024


class AgentDialer:
    """The TLS context the server calls agents with: its client certificate issued (or
    loaded) and the context built once, looked at again every RECHECK seconds."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._context: ssl.SSLContext | None = None
        self._checked = 0.0

    async def context(self, app: web.Application) -> ssl.SSLContext:
        async with self._lock:  # one issue at a time: key and certificate stay a pair
            if self._context is None or time.monotonic() - self._checked > RECHECK:
                cert, key = await asyncio.to_thread(
                    ensure_agent_client_certificate, app[AUTHORITY], app[CONFIG].pki_dir)
                self._context = await asyncio.to_thread(agent_client_context,
                                                        app[AUTHORITY], cert, key)
                self._checked = time.monotonic()
            return self._context


DIALER = web.AppKey("agent_dialer", AgentDialer)


def setup_routes(app: web.Application) -> None:
    app[DIALER] = AgentDialer()
    app.router.add_get("/api/v1/instances/{name}/console", instance_console)


def agent_api(node: Node) -> tuple[str, int] | None:
    """Where ``node``'s agent serves its API to the config server: the address its heartbeat
    came from and the HTTPS port it named (None: loopback only, or plain HTTP)."""
    status = node.facts.get("status") or {}
    port = (status.get("agent") or {}).get("api_port")
    address = status.get("address")
    if not isinstance(port, int) or not isinstance(address, str) or not address:
        return None
    return address, port


def agent_console_url(instance: Instance, node: Node | None, *, force: bool,
                      who: str = "") -> str:
    """Where the console of ``instance`` is now: the claim holder's agent API."""
    if instance.claim is None:
        raise Conflict(f"instance {instance.name} is not placed on any dom0",
                       hint=f"start it: configserver instance start {instance.name}")
    if instance.actual != "running":
        raise Conflict(f"instance {instance.name} is {instance.actual}, not running",
                       hint=f"start it: configserver instance start {instance.name}")
    if node is None:
        raise NotFound(f"the dom0 {instance.claim.node} of {instance.name} is not registered")
    reachable = agent_api(node)
    if reachable is None:
        raise ServerUnavailable(
            f"the agent of {node.hostname or node.mac} serves no API the config server can "
            "reach", hint="its API listens on loopback only or speaks plain HTTP; the agent "
                          "needs its certificate (netboot.ca=) and api_listen unset")
    address, port = reachable
    host = f"[{address}]" if ":" in address else address
    query = urllib.parse.urlencode({**({"force": "1"} if force else {}),
                                    **({"for": who} if who else {})})
    return f"https://{host}:{port}/v1/console/{instance.domain}" + (f"?{query}" if query
                                                                       else "")


def _peer_is(websocket: aiohttp.ClientWebSocketResponse, node: Node, boot_id: str) -> bool:
    """Whether the agent's certificate names ``node`` (its MAC) in its current boot."""
    ssl_object = websocket.get_extra_info("ssl_object")
    peer = ssl_object.getpeercert() if ssl_object is not None else None
    wanted = Identity("node", node.mac, boot_id=boot_id).uri()
    return any(kind == "URI" and value == wanted
               for kind, value in (peer or {}).get("subjectAltName", ()))


async def instance_console(request: web.Request) -> web.StreamResponse:
    instance = await find_instance(request)
    force = request.query.get("force") in ("1", "true")
    who = request[IDENTITY].uri()
    client = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=MAX_FRAME)
    await client.prepare(request)
    try:
        await _relay(request, client, instance, force, who)
    except NetbootError as exc:
        with contextlib.suppress(ConnectionError):
            await client.send_json({"error": exc.to_json()})
    finally:
        await client.close()
    return client


async def _relay(request: web.Request, client: web.WebSocketResponse, instance: Instance,
                 force: bool, who: str) -> None:
    app = request.app
    node = (await asyncio.to_thread(app[REGISTRY].lookup, instance.claim.node)
            if instance.claim else None)
    url = agent_console_url(instance, node, force=force, who=who)
    assert node is not None
    where = node.hostname or node.mac
    session = await asyncio.to_thread(app[REGISTRY].agent_session, node.mac)
    if session is None:
        raise ServerUnavailable(f"{where} has no agent session", hint="is its agent running?")
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)
    try:
        context = await app[DIALER].context(app)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with asyncio.timeout(CONNECT_TIMEOUT):  # TCP, TLS and the upgrade
                agent = await http.ws_connect(url, ssl=context, heartbeat=HEARTBEAT,
                                              max_msg_size=MAX_FRAME)
            async with agent:
                await _relay_to(agent, client, node, url, session.boot_id,
                                what=f"{instance.name} on {where}", who=who)
    except aiohttp.WSServerHandshakeError as exc:
        raise ServerUnavailable(f"the agent of {where} refused the console: {exc.status} "
                                f"{exc.message}") from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
        raise ServerUnavailable(f"cannot reach the agent of {where} at {url}: "
                                f"{exc or type(exc).__name__}") from None


async def _relay_to(agent: aiohttp.ClientWebSocketResponse, client: web.WebSocketResponse,
                    node: Node, url: str, boot_id: str, *, what: str, who: str) -> None:
    if not _peer_is(agent, node, boot_id):
        raise ServerUnavailable(f"the agent at {url} is not {node.hostname or node.mac}'s "
                                f"(boot {boot_id})",
                                hint="its certificate names another node or an earlier boot")
    log.info("console of %s opened by %s", what, who)
    await _pipe(client, agent)
    log.info("console of %s closed by %s", what, who)


async def _pipe(client: web.WebSocketResponse,
                agent: aiohttp.ClientWebSocketResponse) -> None:
    """Frames both ways until either side closes; then both are closed."""

    async def forward(source: Any, sink: Any) -> None:
        async for message in source:
            if message.type == WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif message.type == WSMsgType.TEXT:
                await sink.send_str(message.data)
            else:
                break

    tasks = [asyncio.create_task(forward(client, agent)),
             asyncio.create_task(forward(agent, client))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
        await agent.close()
