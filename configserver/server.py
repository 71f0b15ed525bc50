"""``configserver serve``: HTTP, DHCP and TFTP in one asyncio process around one registry."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

from aiohttp import web

from configserver import statedir
from configserver.config import DhcpMode, ServerConfig, Subnet
from configserver.errors import ConfigError, StoreError
from configserver.http.app import create_app
from configserver.http.appkeys import CATALOG, METRICS
from configserver.http.boot import IPXE_DIR, RESOLVE_MAC
from configserver.http.leaseapi import DHCP
from configserver.http.limits import runner_options
from configserver.listeners import https_listener, renew_server_certificate, unix_listener
from configserver.netif import interface_ipv4
from configserver.pki import CertificateAuthority
from configserver.registry.sqlite import SqliteRegistry
from configserver.telemetry.collectors import DhcpCollector, TftpCollector

log = logging.getLogger(__name__)


def _read_secret(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc


def ensure_secret_key(path: Path) -> bytes:
    """The server's secret key (boot tickets, agent tokens): made at first start, kept 0600."""
    text = _read_secret(path)
    if text:
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise StoreError(f"{path} is not a hex key",
                             hint="remove it to make a new one (running nodes then "
                                  "look up again)") from None
        if len(key) >= 32:
            return key
    key = secrets.token_bytes(32)
    path.parent.mkdir(mode=statedir.DIR_MODE, parents=True, exist_ok=True)
    statedir.write_private(path, key.hex() + "\n")
    log.info("generated the server's secret key in %s", path)
    return key


def sd_notify(address: str | None, message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, \
            contextlib.suppress(OSError):
        sock.sendto(message.encode(), address)


def resolve(config: ServerConfig) -> tuple[ServerConfig, str | None]:
    """Fill in what comes from the interface: our address and the DHCP subnet."""
    address = config.server_address
    if config.interface:
        iface = interface_ipv4(config.interface)
        address = address or str(iface.ip)
        if config.dhcp.mode == DhcpMode.FULL and config.dhcp.subnet is None:
            subnet = Subnet(network=str(iface.network))
            config = dataclasses.replace(config, dhcp=dataclasses.replace(
                config.dhcp, subnet=subnet))
    elif config.dhcp.mode != DhcpMode.OFF:
        raise ConfigError("DHCP needs --interface", hint="e.g. --interface eth1 --dhcp proxy")
    if config.dhcp.mode == DhcpMode.FULL and config.dhcp.subnet is not None:
        subnet = config.dhcp.subnet
        if address and config.dhcp.subnet.router is None:
            subnet = dataclasses.replace(subnet, router=address)
        config = dataclasses.replace(config, dhcp=dataclasses.replace(config.dhcp,
                                                                      subnet=subnet))
    return config, address


async def serve(config: ServerConfig, *, stop: asyncio.Event | None = None,
                expect_event: Callable[[float], None] | None = None) -> None:
    """Run until ``stop`` is set or SIGTERM/SIGINT arrives.

    ``expect_event`` is the event loop's ``PollingSelector.expect`` when it has one.
    """
    config, address = resolve(config)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    async with AsyncExitStack() as stack:
        statedir.prepare(config.state_dir)
        registry = SqliteRegistry(config.registry_path)
        stack.callback(registry.close)
        secret_key = ensure_secret_key(config.state_dir / "server.key")
        if config.unknown_mac is not None:
            registry.set_unknown_mac_policy(config.unknown_mac)
        authority = await asyncio.to_thread(CertificateAuthority.load_or_create,
                                            config.pki_dir)
        https = await https_listener(config, authority, address)
        stack.callback(https.sock.close)
        log.info("HTTPS API on %s:%d (%s), CA %s", config.http.listen, https.port,
                 https.api_base, authority.fingerprint)
        local = unix_listener(config.socket_path)
        stack.callback(local.close)
        stack.callback(_remove_socket, config.socket_path, os.stat(config.socket_path).st_ino)

        app = create_app(config, registry, authority, api_base=https.api_base,
                         secret_key=secret_key)
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               **runner_options(config.http))
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        for sock, context in ((https.sock, https.context), (local, None)):
            await web.SockSite(runner, sock, ssl_context=context, backlog=1024).start()
        renewal = asyncio.create_task(renew_server_certificate(config, authority, https),
                                      name="server-certificate-renewal")
        stack.callback(renewal.cancel)
        site = web.TCPSite(runner, config.http.listen, config.http.port,
                           reuse_address=True, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {config.http.listen}:{config.http.port}: "
                              f"{exc.strerror}", hint="choose another --http-port") from None
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        host = address or (config.http.listen if config.http.listen not in ("0.0.0.0", "::")
                           else "127.0.0.1")
        http_base = (config.http.public_url or f"http://{host}:{port}").rstrip("/")
        log.info("HTTP on %s:%d, nodes use %s", config.http.listen, port, http_base)

        dhcp = None
        if config.dhcp.mode != DhcpMode.OFF:
            from configserver.dhcp.service import start_dhcp

            assert address is not None
            dhcp = await start_dhcp(config, registry, server_address=address,
                                    http_base=http_base, tftp_enabled=_tftp_on(config))
            stack.push_async_callback(dhcp.close)
            app[RESOLVE_MAC].leases = dhcp.mac_for_ip
            app[DHCP].service = dhcp
            app[METRICS].add(DhcpCollector(lambda: app[DHCP].service))
            log.info("DHCP (%s) on %s", config.dhcp.mode, config.interface)
        if _tftp_on(config):
            from configserver.tftp.service import start_tftp

            catalog = app[CATALOG]

            def image_file(rest: str) -> Path | None:
                # images/<image>/<file>: only files an image's manifest lists, as over HTTP.
                name, _, filename = rest.partition("/")
                image = catalog.get(name)
                return image.path(filename) if image else None

            roots: dict[str, Path | Callable[[str], Path | None]] = {
                "": app[IPXE_DIR], "images/": image_file}
            # Debian links some iPXE binaries to /boot (ipxe.efi -> /boot/ipxe.efi); a root
            # key without a trailing slash names exactly one file, so only those are served.
            for entry in sorted(Path(app[IPXE_DIR]).glob("*")):
                if entry.is_symlink() and entry.is_file():
                    roots[entry.name] = entry
            tftp = await start_tftp(config, roots, resolve_mac=app[RESOLVE_MAC],
                                    record_event=registry.record_event,
                                    expect_event=expect_event)
            stack.push_async_callback(tftp.close)
            app[METRICS].add(TftpCollector(tftp))

        endpoint = {"url": f"https://{_local(config.http.listen)}:{https.port}",
                    "socket": str(config.socket_path), "api_base": https.api_base,
                    "http_url": f"http://{_local(config.http.listen)}:{port}",
                    "ca_fingerprint": authority.fingerprint, "pid": os.getpid(),
                    "boot_url": http_base}
        statedir.write_private(config.endpoint_path, json.dumps(endpoint) + "\n")
        stack.callback(_remove_endpoint, config.endpoint_path, os.getpid())

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            stack.callback(loop.remove_signal_handler, sig)
        sd_notify(config.notify_socket, "READY=1\nSTATUS=serving")
        log.info("config server ready (state %s, images %s)", config.state_dir,
                 config.images_dir)
        await stop.wait()
        sd_notify(config.notify_socket, "STOPPING=1")
        log.info("config server stopping")


def _tftp_on(config: ServerConfig) -> bool:
    return config.tftp.enabled and (config.interface is not None
                                    or config.tftp.bind_address != "0.0.0.0")


def _local(listen: str) -> str:
    return "127.0.0.1" if listen in ("0.0.0.0", "", "::") else listen


def _remove_socket(path: Path, inode: int) -> None:
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == inode:  # not another server's socket since
            path.unlink()


def _remove_endpoint(path: Path, pid: int) -> None:
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
