"""Live changes: udev block events and rtnetlink link/address events, debounced.

The netlink side is a plain ``AF_NETLINK`` socket subscribed to the link and address groups: the
agent only needs to know *that* something changed (the inventory child reads the details through
pyroute2), which keeps pyroute2 out of the resident process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100


class Debouncer:
    """Calls ``action`` once things have been quiet for ``quiet`` seconds (at most ``longest``
    after the first trigger of a burst)."""

    def __init__(self, action: Callable[[], None], quiet: float, longest: float) -> None:
        self._action = action
        self._quiet = quiet
        self._longest = max(longest, quiet)
        self._first: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def trigger(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._first is None:
            self._first = now
        if self._timer is not None:
            self._timer.cancel()
        due = min(now + self._quiet, self._first + self._longest)
        self._timer = loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self._first = None
        self._timer = None
        self._action()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._first = None


def _netlink_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_ROUTE)
    sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
    sock.setblocking(False)
    return sock


def _drain(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return count
        except OSError as exc:  # ENOBUFS: events were lost, which is still a change
            log.debug("netlink receive: %s", exc)
            return count + 1
        count += 1


@contextlib.contextmanager
def watch_changes(on_change: Callable[[], None]) -> Iterator[list[str]]:
    """Call ``on_change`` (not debounced) for each batch of events; yields the sources watched.

    A source that cannot be opened (no netlink, no libudev) is logged and skipped.
    """
    loop = asyncio.get_running_loop()
    sources: list[str] = []
    with contextlib.ExitStack() as stack:
        try:
            sock = stack.enter_context(_netlink_socket())
        except OSError as exc:
            log.warning("not watching network changes: %s", exc)
        else:
            def on_netlink() -> None:
                if _drain(sock):
                    on_change()
            loop.add_reader(sock.fileno(), on_netlink)
            stack.callback(loop.remove_reader, sock.fileno())
            sources.append("netlink")
        monitor = _udev_monitor()
        if monitor is not None:
            def on_udev() -> None:
                seen = 0
                while monitor.poll(timeout=0) is not None:
                    seen += 1
                if seen:
                    on_change()
            loop.add_reader(monitor.fileno(), on_udev)
            stack.callback(loop.remove_reader, monitor.fileno())
            sources.append("udev")
        yield sources


def _udev_monitor():  # -> pyudev.Monitor | None
    try:
        import pyudev

        context = pyudev.Context()
        # Without a udev daemon (containers, early boot) listen to the kernel's own events.
        source = "udev" if Path("/run/udev/control").exists() else "kernel"
        monitor = pyudev.Monitor.from_netlink(context, source=source)
        monitor.filter_by("block")
        monitor.start()
        os.set_blocking(monitor.fileno(), False)
        return monitor
    except Exception as exc:
        log.warning("not watching disk changes: %s", exc)
        return None
