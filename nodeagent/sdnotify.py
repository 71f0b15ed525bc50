"""systemd readiness notification (sd_notify) without any dependency."""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)


def notify(socket_path: str | None, *messages: str) -> bool:
    """Send ``KEY=value`` lines to ``$NOTIFY_SOCKET``; False when there is no socket."""
    if not socket_path:
        return False
    address = "\0" + socket_path[1:] if socket_path.startswith("@") else socket_path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(messages).encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", socket_path, exc)
        return False
    return True
