"""``nodeagent run``: composes the session, the watcher, the local API and readiness."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl

import aiohttp
from aiohttp import web

from nodeagent import sdnotify
from nodeagent.api import create_local_app
from nodeagent.client import ServerClient
from nodeagent.config import AgentConfig
from nodeagent.session import (
    AgentSession,
    file_inventory,
    found_macs,
    subprocess_inventory,
)
from nodeagent.watch import Debouncer, watch_changes

log = logging.getLogger(__name__)


async def _start_local_api(runner: web.AppRunner, config: AgentConfig,
                           tls: ssl.SSLContext | None) -> None:
    site = web.TCPSite(runner, config.api_address, config.api_port, ssl_context=tls)
    try:
        await site.start()
        log.info("local API on %s://%s:%d", "https" if tls else "http", config.api_address,
                 config.api_port)
    except OSError as exc:
        log.error("local API disabled: cannot listen on %s:%d: %s",
                  config.api_address, config.api_port, exc)


async def _start_local_api_when_enrolled(runner: web.AppRunner, config: AgentConfig,
                                         session: AgentSession) -> None:
    await session.enrolled.wait()
    await _start_local_api(runner, config, session.api_tls())


async def run_agent(config: AgentConfig) -> None:
    """Run until SIGTERM/SIGINT; never returns on its own."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)

    inventory_source = (file_inventory(config.inventory_file) if config.inventory_file
                        else subprocess_inventory())
    connector = aiohttp.TCPConnector(limit=4, enable_cleanup_closed=True)
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
        client = ServerClient(config.api_url, http, config.request_timeout)
        session = AgentSession(config, client, inventory_source, macs=found_macs())
        log.info("agent starting: server %s, API %s, boot %s, MACs %s", config.server,
                 config.api_url,
                 config.boot_id, ",".join(session.macs) or "none")

        if config.api_port:
            runner = web.AppRunner(create_local_app(session), access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            if session.key is None:
                await _start_local_api(runner, config, None)
            else:  # HTTPS with this boot's certificate, once there is one
                starter = asyncio.create_task(_start_local_api_when_enrolled(runner, config,
                                                                             session))
                stack.callback(starter.cancel)

        if config.watch and not config.inventory_file:
            debouncer = Debouncer(session.request_inventory, config.inventory_debounce,
                                  config.inventory_debounce * 5)
            stack.callback(debouncer.cancel)
            sources = stack.enter_context(watch_changes(debouncer.trigger))
            log.info("watching %s for changes", " and ".join(sources) or "nothing")

        protocol = asyncio.create_task(session.run(), name="agent-session")
        sdnotify.notify(config.notify_socket, "READY=1",
                        f"STATUS=looking up at {config.server}")
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({protocol, stopper}, return_when=asyncio.FIRST_COMPLETED)
        sdnotify.notify(config.notify_socket, "STOPPING=1")
        for task in (protocol, stopper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if protocol in done and protocol.exception():
            raise protocol.exception()  # pragma: no cover - the session loops forever
        log.info("agent stopped")
