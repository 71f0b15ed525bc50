"""HTTP client for the config server's agent API (lookup, enroll, heartbeat, inventory).

It only moves requests and answers and maps failures onto ``ServerError`` subclasses; when to
retry is the session's business.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from nodeagent.errors import ServerError, TokenRejected
from nodeagent.identity import Certificate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LookupAnswer:
    """Who the server says this machine is, and the token for this boot (or None)."""

    mac: str
    hostname: str | None
    role: str | None
    heartbeat_interval: float
    token: str | None
    # Why the server issued no token for a new boot (the old agent still beats, no ticket).
    refused: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"mac": self.mac, "hostname": self.hostname, "role": self.role,
                "heartbeat_interval": self.heartbeat_interval}


class ServerClient:
    """Calls ``/api/v1/agent/*`` on one config server."""

    def __init__(self, base_url: str, http: aiohttp.ClientSession, timeout: float,
                 tls: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        # The TLS context of every call: the pinned CA, then also this node's certificate.
        self.tls = tls

    async def enroll(self, mac: str, boot_id: str, csr: bytes,
                     token: str | None) -> Certificate:
        """A certificate for this boot's key: bought with the token, renewed with mTLS."""
        answer = await self._post("enroll", {"mac": mac, "boot_id": boot_id,
                                             "csr": csr.decode()}, token)
        try:
            not_after = float(answer["not_after"])
            renew_after = float(answer.get("renew_after") or
                                time.time() + (not_after - time.time()) / 2)
            return Certificate(str(answer["certificate"]).encode(), not_after, renew_after)
        except (KeyError, TypeError, ValueError) as exc:
            raise ServerError(f"unusable enrollment answer: {exc!r}") from None

    async def lookup(self, macs: list[str], boot_id: str, nonce: str | None,
                     ticket: str | None = None) -> LookupAnswer:
        body: dict[str, Any] = {"macs": macs, "boot_id": boot_id, "nonce": nonce}
        if ticket:
            body["ticket"] = ticket
        answer = await self._post("lookup", body, None)
        try:
            node = answer["node"]
            return LookupAnswer(mac=str(node["mac"]), hostname=node.get("hostname"),
                                role=node.get("role"),
                                heartbeat_interval=float(answer["heartbeat_interval"]),
                                token=answer.get("token"),
                                refused=str(answer["refused"])[:200]
                                if answer.get("refused") else None)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ServerError(f"unusable lookup answer: {exc!r}") from None

    async def heartbeat(self, mac: str, boot_id: str, token: str | None,
                        status: dict[str, Any]) -> dict[str, Any]:
        return await self._post("heartbeat", {"mac": mac, "boot_id": boot_id,
                                              "status": status}, token)

    async def push_inventory(self, mac: str, boot_id: str, token: str | None,
                             inventory: dict[str, Any]) -> None:
        await self._post("inventory", {"mac": mac, "boot_id": boot_id,
                                       "inventory": inventory}, token)

    async def work(self, mac: str, boot_id: str, token: str | None, after: int | None,
                   wait: float) -> dict[str, Any]:
        """This node's desired state; waits up to ``wait`` s for a generation after ``after``."""
        params = {"mac": mac, "boot_id": boot_id, "wait": f"{wait:g}"}
        if after is not None:
            params["after"] = str(after)
        timeout = aiohttp.ClientTimeout(total=(self._timeout.total or 30.0) + wait)
        return await self._request("GET", "work", None, token, params=params,
                                   timeout=timeout)

    async def report(self, mac: str, boot_id: str, token: str | None, *,
                     generation: int | None, role: str, report: dict[str, Any]) -> None:
        """What this node's role actually has, after a reconcile pass."""
        await self._post("report", {"mac": mac, "boot_id": boot_id,
                                    "generation": generation, role: report}, token)

    async def claim(self, mac: str, boot_id: str, token: str | None, instance: str,
                    epoch: int) -> bool:
        """Whether this node holds ``instance``'s claim of ``epoch`` now (asked just before
        ``xl create``): False on the server's 409, ServerError if it cannot say."""
        try:
            answer = await self._post("claim", {"mac": mac, "boot_id": boot_id,
                                                "instance": instance, "epoch": epoch}, token)
        except ServerError as exc:
            if exc.http_status == 409:
                return False
            raise
        return answer.get("held") is True

    async def download(self, url: str, destination: Path) -> None:
        """A file the config server serves over plain HTTP (a guest kernel), to
        ``destination``; the caller checks its sha256."""
        timeout = aiohttp.ClientTimeout(total=max(self._timeout.total or 30.0, 300.0))
        try:
            async with self.http.get(url, timeout=timeout) as response:
                if response.status != 200:
                    raise ServerError(f"{url}: HTTP {response.status}",
                                      http_status=response.status)
                with destination.open("wb") as out:
                    async for chunk in response.content.iter_chunked(1 << 20):
                        await asyncio.to_thread(out.write, chunk)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ServerError(f"{url}: {type(exc).__name__}: {exc}") from None

    async def _post(self, endpoint: str, body: dict[str, Any],
                    token: str | None) -> dict[str, Any]:
        return await self._request("POST", endpoint, body, token)

    async def _request(self, method: str, endpoint: str, body: dict[str, Any] | None,
                       token: str | None, *, params: dict[str, str] | None = None,
                       timeout: aiohttp.ClientTimeout | None = None) -> dict[str, Any]:
        url = f"{self.base_url}/api/v1/agent/{endpoint}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with self.http.request(method, url, json=body, headers=headers,
                                         params=params, timeout=timeout or self._timeout,
                                         ssl=self.tls if self.tls is not None else True
                                         ) as response:
                try:
                    answer = await response.json(content_type=None)
                except ValueError:
                    answer = None
                if response.status == 401:
                    raise TokenRejected(f"{endpoint}: the server refused the agent token",
                                        http_status=401)
                if response.status >= 400:
                    message = answer.get("message") if isinstance(answer, dict) else None
                    raise ServerError(
                        f"{endpoint}: HTTP {response.status}: {message or response.reason}",
                        http_status=response.status,
                        retry_after=_retry_after(response.headers.get("Retry-After")))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ServerError(f"{endpoint}: cannot reach {self.base_url}: "
                              f"{type(exc).__name__}: {exc}") from None
        if not isinstance(answer, dict):
            raise ServerError(f"{endpoint}: the answer is not a JSON object")
        return answer


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
