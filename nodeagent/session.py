"""The agent's conversation with the config server: lookup, heartbeats, inventory pushes.

* Lookup with every MAC of the machine and the per-boot identifier; an unreachable or refusing
  server is retried with exponential backoff and jitter, forever.
* Each lookup carries a secret nonce kept in ``state_dir/session.json`` (a tmpfs: it dies with
  the boot). The server derives the token from it and sends the same token again to a lookup
  with the same nonce, so a lost answer or an agent restarted within the same boot recovers,
  while anyone else gets ``token: null``. After a 401 the agent starts over with a new nonce.
* The token is also written to ``state_dir/token.json`` (0600) for local API callers.
* Heartbeats go out at the server's interval with jitter; a 401 drops the token and looks up again.
* Inventory pushes happen after every lookup and whenever ``request_inventory`` is called
  (the watcher, debounced); failures are retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeagent import __version__, sdnotify
from nodeagent.client import LookupAnswer, ServerClient
from nodeagent.config import AgentConfig
from nodeagent.errors import InventoryError, NoToken, ServerError, TokenRejected
from nodeagent.identity import (
    Certificate,
    NodeKey,
    api_server_context,
    fetch_boot_trust,
    server_context,
)
from nodeagent.inventory import platform, procfs
from nodeagent.plugins import PluginContext, ToolUnavailable, role_facts, run_tool
from nodeagent.roles import Reconciler, Role, ServerHooks, role_for
from nodeagent.selffence import SelfFence, destroy_guests

log = logging.getLogger(__name__)

InventorySource = Callable[[], Awaitable[dict[str, Any]]]
ROLE_FACTS_MAX_AGE = 60.0
MIN_INTERVAL = 0.1


class Backoff:
    """Exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling to a cap."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = max(initial, 0.001)
        self.maximum = max(maximum, self.initial)
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay(self, at_least: float | None = None) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** min(self.attempts, 32))
        self.attempts += 1
        delay = self._rng.uniform(ceiling / 2, ceiling)
        if at_least is not None:
            delay = max(delay, min(at_least, self.maximum))
        return delay

    def reset(self) -> None:
        self.attempts = 0


@dataclass
class AgentStatus:
    """What the agent is doing, for logs and the local API."""

    phase: str = "starting"
    node: LookupAnswer | None = None
    lookups: int = 0
    heartbeats: int = 0
    inventory_pushes: int = 0
    last_heartbeat: float | None = None
    last_error: str | None = None
    started: float = field(default_factory=time.time)
    # Seconds each accepted heartbeat's round trip took: in all, and the latest (metrics).
    heartbeat_seconds: float = 0.0
    last_heartbeat_seconds: float | None = None
    heartbeat_failures: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "node": self.node.to_json() if self.node else None,
                "lookups": self.lookups, "heartbeats": self.heartbeats,
                "inventory_pushes": self.inventory_pushes,
                "last_heartbeat": self.last_heartbeat, "last_error": self.last_error,
                "started": self.started}


def found_macs(root: Path = Path("/"), limit: int = 64) -> tuple[str, ...]:
    """MACs of the machine's Ethernet interfaces from sysfs (no netlink needed).

    Physical NICs come first, then virtual ones (bridges, vifs, veths), at most ``limit``.
    """
    base = root / "sys/class/net"
    physical: list[str] = []
    virtual: list[str] = []
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return ()
    for name in names:
        address = (platform.read_text(base / name / "address") or "").strip().lower()
        kind = (platform.read_text(base / name / "type") or "").strip()
        if kind != "1" or not address or address == "00:00:00:00:00:00":
            continue
        (physical if (base / name / "device").exists() else virtual).append(address)
    return tuple(dict.fromkeys(physical + virtual))[:limit]


def machine_status(root: Path = Path("/")) -> dict[str, Any]:
    """Uptime, load and memory, read fresh from procfs for each heartbeat."""
    return {
        "uptime": procfs.parse_uptime(platform.read_text(root / "proc/uptime") or ""),
        "load": procfs.parse_loadavg(platform.read_text(root / "proc/loadavg") or ""),
        "memory": procfs.parse_meminfo(platform.read_text(root / "proc/meminfo") or ""),
    }


def agent_rss_bytes() -> int | None:
    text = platform.read_text(Path("/proc/self/status")) or ""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def subprocess_inventory(timeout: float = 120.0) -> InventorySource:
    """Collect the inventory in a child process (``nodeagent inventory --json``).

    The resident agent never loads pyroute2 this way (it stays under its memory target), and a
    crash on odd hardware costs one child, not the agent.
    """
    async def collect() -> dict[str, Any]:
        try:
            stdout = await run_tool([sys.executable, "-m", "nodeagent", "inventory", "--json"],
                                    timeout)
        except ToolUnavailable as exc:
            raise InventoryError(f"inventory collection failed: {exc.message}") from None
        try:
            data = json.loads(stdout)
        except ValueError as exc:
            raise InventoryError(f"inventory collection printed bad JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InventoryError("inventory collection printed JSON that is not an object")
        return data
    return collect


def file_inventory(path: Path) -> InventorySource:
    """A recorded inventory read from ``path`` (simulating another machine)."""
    async def collect() -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InventoryError(f"cannot read recorded inventory {path}: {exc}") from None
        if not isinstance(data, dict):
            raise InventoryError(f"recorded inventory {path} is not a JSON object")
        return data
    return collect


# What the role plugins report for a role (the heartbeat's "role" facts).
RoleFactsSource = Callable[[str | None], Awaitable[dict[str, Any]]]


async def _plugin_facts(role: str | None) -> dict[str, Any]:
    return await role_facts(role, PluginContext())


class AgentSession:
    """Runs the lookup / heartbeat / inventory protocol until cancelled."""

    def __init__(self, config: AgentConfig, client: ServerClient,
                 inventory_source: InventorySource, *, macs: tuple[str, ...] = (),
                 rng: random.Random | None = None,
                 role_facts_source: RoleFactsSource | None = None,
                 cloud_roles: Callable[[str | None, ServerHooks], Role | None] = role_for
                 ) -> None:
        self.config = config
        self.client = client
        self.status = AgentStatus()
        self.inventory: dict[str, Any] | None = None
        self.token: str | None = None
        self._inventory_source = inventory_source
        self.macs = config.lookup_macs(macs)
        self._rng = rng or random.Random()
        self._authenticated = asyncio.Event()
        self._inventory_wanted = asyncio.Event()
        self._role_facts: tuple[float, dict[str, Any]] | None = None
        self._role_facts_source = role_facts_source or _plugin_facts
        self._token_file = config.state_dir / "token.json"
        self._session_file = config.state_dir / "session.json"
        self._nonce: str | None = None
        # With an HTTPS API: this boot's key, the pinned CA and the certificate in use.
        self.key = NodeKey(config.state_dir) if config.ca_fingerprint else None
        self.certificate: Certificate | None = None
        self._ca_pem: bytes | None = None
        self.enrolled = asyncio.Event()
        self._api_tls: ssl.SSLContext | None = None
        # The cloud part of the role (storage, dom0), once the lookup named the role.
        self.reconciler: Reconciler | None = None
        self._cloud_roles = cloud_roles
        self._reconcile_task: asyncio.Task[None] | None = None
        self.self_fence = SelfFence(config.state_dir)
        self._fence_task: asyncio.Task[None] | None = None

    # -- public ------------------------------------------------------------------------------

    async def run(self) -> None:
        pusher = asyncio.create_task(self._push_inventory_forever(), name="inventory-push")
        # From the start, not from the first lookup: an agent restarted while its dom0 is
        # cut off knows the limit from its state directory and must still act on it.
        self._fence_task = asyncio.create_task(self.self_fence.run(self._self_fence),
                                               name="self-fence")
        try:
            if self.key is not None:
                await self._trust_pinned_ca()
            while True:
                await self._look_up_until_accepted()
                self._start_reconciling()
                try:
                    await self._heartbeat_forever()
                except TokenRejected as exc:
                    log.warning("%s: %s; looking up again", self._mac(), exc.message)
                    self.status.last_error = exc.message
                    self._forget_token()
        finally:
            pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pusher
            for task in (self._reconcile_task, self._fence_task):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    def _start_reconciling(self) -> None:
        """Run the role's reconcile loop (once per agent; it survives a new lookup)."""
        if self._reconcile_task is not None or self.status.node is None:
            return
        role = self._cloud_roles(self.status.node.role,
                                 ServerHooks(self._confirm_claim, self.client.download,
                                             self._credentials()))
        if role is None:
            return
        self.reconciler = Reconciler(role, self._fetch_work, self._post_report)
        self._reconcile_task = asyncio.create_task(self.reconciler.run(),
                                                   name=f"reconcile-{role.name}")
        log.info("%s: reconciling the %s role toward the control plane", self._mac(),
                 role.name)

    async def _self_fence(self, reason: str) -> int:
        """The dom0 role's self-fence (its events reach the next report), or, before the
        lookup named the role, ``xl destroy`` of our domains directly."""
        fence = getattr(self.reconciler.role if self.reconciler else None, "self_fence", None)
        return await (fence(reason) if fence is not None else destroy_guests(reason))

    async def _fetch_work(self, after: int | None, wait: float) -> dict[str, Any]:
        await self._authenticated.wait()
        assert self.status.node is not None
        return await self.client.work(self.status.node.mac, self.config.boot_id,
                                      self._credential(), after, wait)

    async def _confirm_claim(self, instance: str, epoch: int) -> bool:
        await self._authenticated.wait()
        assert self.status.node is not None
        return await self.client.claim(self.status.node.mac, self.config.boot_id,
                                       self._credential(), instance, epoch)

    async def _post_report(self, generation: int | None, role: str,
                           report: dict[str, Any]) -> None:
        await self._authenticated.wait()
        assert self.status.node is not None
        await self.client.report(self.status.node.mac, self.config.boot_id,
                                 self._credential(), generation=generation, role=role,
                                 report=report)

    def request_inventory(self) -> None:
        """Ask for a fresh inventory push (collected again)."""
        self._inventory_wanted.set()

    async def role_facts(self, max_age: float = ROLE_FACTS_MAX_AGE) -> dict[str, Any]:
        now = time.monotonic()
        if self._role_facts is None or now - self._role_facts[0] > max_age:
            role = self.status.node.role if self.status.node else self.config.role
            self._role_facts = (now, await self._role_facts_source(role))
        return self._role_facts[1]

    # -- lookup ------------------------------------------------------------------------------

    def _mac(self) -> str:
        if self.status.node:
            return self.status.node.mac
        return self.macs[0] if self.macs else "unknown-mac"

    async def _look_up_until_accepted(self) -> None:
        backoff = Backoff(self.config.backoff_initial, self.config.backoff_max, self._rng)
        self._authenticated.clear()
        self.status.phase = "lookup"
        while True:
            self.status.lookups += 1
            try:
                if not self.macs:
                    raise ServerError("no MAC address to look up with",
                                      hint="no Ethernet interface found; pass --mac")
                answer = await self.client.lookup(list(self.macs), self.config.boot_id,
                                                  self._lookup_nonce(),
                                                  self.config.boot_ticket)
                self.token = self._accept(answer)
                if self.key is not None:
                    await self._enroll(answer.mac)
                break
            except NoToken as exc:
                self.status.last_error = exc.message
                delay = backoff.next_delay()
                log.error("%s: %s (%s); retrying lookup in %.1fs", self._mac(), exc.message,
                          exc.hint, delay)
            except ServerError as exc:
                self.status.last_error = exc.message
                delay = backoff.next_delay(exc.retry_after)
                log.warning("%s: lookup failed: %s; retrying in %.1fs", self._mac(),
                            exc.message, delay)
            await asyncio.sleep(delay)
        self.status.node = answer
        self.status.phase = "heartbeat"
        self._authenticated.set()
        sdnotify.notify(self.config.notify_socket,
                        f"STATUS=reporting to {self.config.server} as {answer.mac} "
                        f"({answer.hostname or 'no hostname'}, role {answer.role})")
        self.request_inventory()
        log.info("%s: looked up as %s (role %s), heartbeat every %.1fs", answer.mac,
                 answer.hostname, answer.role, answer.heartbeat_interval)

    def _accept(self, answer: LookupAnswer) -> str:
        if not answer.token and answer.refused:
            raise NoToken(f"the server issued no token for boot {self.config.boot_id}: "
                          f"{answer.refused}",
                          hint="a new boot takes over once the node's previous agent has "
                               "stopped heartbeating, with this boot's netboot.ticket")
        if not answer.token:
            raise NoToken(f"the server issued no token: one was already issued for boot "
                          f"{self.config.boot_id} to another lookup",
                          hint="reboot the node or remove and re-add it on the server")
        self._write_private(self._token_file, {"server": self.config.server,
                                               "boot_id": self.config.boot_id,
                                               "mac": answer.mac, "token": answer.token})
        return answer.token

    def _lookup_nonce(self) -> str:
        """This boot's lookup nonce: kept across agent restarts, new after a 401."""
        if self._nonce is None:
            try:
                saved = json.loads(self._session_file.read_text())
            except (OSError, ValueError):
                saved = None
            if (isinstance(saved, dict) and saved.get("boot_id") == self.config.boot_id
                    and saved.get("server") == self.config.server
                    and isinstance(saved.get("nonce"), str)):
                self._nonce = saved["nonce"]
            else:
                self._new_nonce()
        assert self._nonce is not None
        return self._nonce

    def _new_nonce(self) -> None:
        self._nonce = secrets.token_urlsafe(32)
        self._write_private(self._session_file, {"server": self.config.server,
                                                 "boot_id": self.config.boot_id,
                                                 "nonce": self._nonce})

    def _write_private(self, path: Path, record: dict[str, Any]) -> None:
        """Write ``record`` as JSON readable by the owner only (atomically)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("%s: cannot write %s: %s", self._mac(), path, exc)

    async def _trust_pinned_ca(self) -> None:
        """Learn the API's URL and CA from the boot server, trusting only the pinned CA;
        retried until the boot server answers."""
        assert self.config.ca_fingerprint is not None
        backoff = Backoff(self.config.backoff_initial, self.config.backoff_max, self._rng)
        while self._ca_pem is None:
            try:
                trust = await fetch_boot_trust(self.client.http, self.config.server,
                                               self.config.ca_fingerprint,
                                               self.config.request_timeout)
            except ServerError as exc:
                self.status.last_error = exc.message
                delay = backoff.next_delay(exc.retry_after)
                log.warning("%s: %s; retrying in %.1fs", self._mac(), exc.message, delay)
                await asyncio.sleep(delay)
                continue
            self._ca_pem = trust.ca_pem
            self.client.base_url = self.config.api or trust.api_url
        self.client.tls = server_context(self._ca_pem)
        log.info("%s: API at %s, its CA pinned by %s", self._mac(), self.client.base_url,
                 self.config.ca_fingerprint)

    async def _enroll(self, mac: str) -> None:
        """A certificate for this boot: the one kept from an earlier start, else a new one
        bought with the token (or, to renew, with the current certificate)."""
        assert self.key is not None and self._ca_pem is not None
        certificate = None if self.certificate else self.key.saved(self.config.boot_id)
        if certificate is None:
            token = None if self.certificate else self.token
            certificate = await self.client.enroll(mac, self.config.boot_id,
                                                   await asyncio.to_thread(self.key.csr, mac),
                                                   token)
            await asyncio.to_thread(self.key.store, certificate, self.config.boot_id)
            log.info("%s: certificate issued for boot %s, valid until %s", mac,
                     self.config.boot_id, time.strftime("%Y-%m-%d %H:%M:%S",
                                                        time.gmtime(certificate.not_after)))
        self.client.tls = await asyncio.to_thread(self.key.client_context, self._ca_pem)
        self.certificate = certificate
        if self._api_tls is not None:  # new handshakes of the own API present the new one
            await asyncio.to_thread(self._api_tls.load_cert_chain, self.key.cert_path,
                                    self.key.key_path)
        self.enrolled.set()

    def _credentials(self) -> tuple[Path, Path, Path] | None:
        """This boot's certificate and key and the CA, as files for a helper process (the
        live-migration stream); None before the node holds a certificate."""
        if self.key is None or self._ca_pem is None or self.certificate is None:
            return None
        ca = self.config.state_dir / "ca.pem"
        if not ca.exists() or ca.read_bytes() != self._ca_pem:
            partial = ca.with_name(".ca.pem.tmp")
            partial.write_bytes(self._ca_pem)
            partial.replace(ca)
        return self.key.cert_path, self.key.key_path, ca

    def api_tls(self) -> ssl.SSLContext:
        """The TLS context of the agent's own API (after enrollment), kept current."""
        assert self.key is not None and self._ca_pem is not None
        if self._api_tls is None:
            self._api_tls = api_server_context(self._ca_pem, self.key)
        return self._api_tls

    async def _renew_if_due(self, mac: str) -> None:
        if self.certificate is None or time.time() < self.certificate.renew_after:
            return
        try:
            await self._enroll(mac)
        except TokenRejected:
            raise
        except ServerError as exc:  # the old certificate is still good: try again later
            log.warning("%s: certificate renewal failed: %s", mac, exc.message)

    def _credential(self) -> str | None:
        """What heartbeats and pushes carry: nothing once the certificate speaks for us."""
        return None if self.certificate is not None else self.token

    def _forget_token(self) -> None:
        self.token = None
        self.certificate = None
        if self._ca_pem is not None:
            self.client.tls = server_context(self._ca_pem)
        self._authenticated.clear()
        with contextlib.suppress(OSError):
            self._token_file.unlink()
        self._new_nonce()

    # -- heartbeats --------------------------------------------------------------------------

    async def _heartbeat_forever(self) -> None:
        assert self.status.node is not None and self.token is not None
        interval = max(MIN_INTERVAL, self.status.node.heartbeat_interval)
        backoff = Backoff(self.config.backoff_initial, self.config.backoff_max, self._rng)
        jitter = self.config.heartbeat_jitter
        while True:
            report = {**machine_status(), "agent": {"version": __version__,
                                                    "rss_bytes": agent_rss_bytes(),
                                                    "api_port": self._api_port()},
                      "role": await self.role_facts()}
            try:
                await self._renew_if_due(self.status.node.mac)
                sent = time.monotonic()
                answer = await self.client.heartbeat(self.status.node.mac, self.config.boot_id,
                                                     self._credential(), report)
            except TokenRejected:
                raise
            except ServerError as exc:
                self.status.last_error = exc.message
                self.status.heartbeat_failures += 1
                delay = min(backoff.next_delay(exc.retry_after), interval)
                log.warning("%s: heartbeat failed: %s; retrying in %.1fs",
                            self.status.node.mac, exc.message, delay)
                await asyncio.sleep(delay)
                continue
            if backoff.attempts:
                log.info("%s: heartbeats accepted again", self.status.node.mac)
            backoff.reset()
            took = time.monotonic() - sent
            self.status.heartbeats += 1
            self.status.heartbeat_seconds += took
            self.status.last_heartbeat_seconds = took
            self.status.last_heartbeat = time.time()
            self.status.last_error = None
            self.self_fence.accepted(answer.get("self_fence_after"))
            with contextlib.suppress(TypeError, ValueError):
                interval = max(MIN_INTERVAL, float(answer.get("heartbeat_interval", interval)))
            await asyncio.sleep(interval * self._rng.uniform(1 - jitter, 1 + jitter))

    def _api_port(self) -> int | None:
        """The port of the API the config server may call (HTTPS on every address), if any."""
        config = self.config
        reachable = config.api_address not in ("127.0.0.1", "::1", "localhost")
        return config.api_port if config.api_port and self.key is not None and reachable \
            else None

    # -- inventory ---------------------------------------------------------------------------

    async def _push_inventory_forever(self) -> None:
        backoff = Backoff(self.config.backoff_initial, self.config.backoff_max, self._rng)
        while True:
            await self._inventory_wanted.wait()
            await self._authenticated.wait()
            self._inventory_wanted.clear()
            try:
                inventory = await self._inventory_source()
                self.inventory = inventory
                assert self.status.node is not None and self.token is not None
                await self.client.push_inventory(self.status.node.mac, self.config.boot_id,
                                                 self._credential(), inventory)
            except (ServerError, InventoryError) as exc:
                self._inventory_wanted.set()
                delay = backoff.next_delay(getattr(exc, "retry_after", None))
                log.warning("%s: inventory push failed: %s; retrying in %.1fs", self._mac(),
                            exc.message, delay)
                await asyncio.sleep(delay)
                continue
            except Exception:  # a bug here must not stop inventory pushes for good
                self._inventory_wanted.set()
                delay = backoff.next_delay(None)
                log.exception("%s: inventory push failed; retrying in %.1fs", self._mac(),
                              delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self.status.inventory_pushes += 1
            log.info("%s: inventory pushed (%d disks, %d nics)", self._mac(),
                     len(inventory.get("disks") or []), len(inventory.get("nics") or []))
