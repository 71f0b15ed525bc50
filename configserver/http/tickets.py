"""Boot tickets: the link from a node's boot script to the agent of that boot.

Every boot script that boots an image puts ``netboot.ticket=<ticket>`` on the kernel command
line. A ticket is ``<issued>.<tag>``: the time the script was rendered, in milliseconds, and an
HMAC over the node's MAC and that time under the server's secret key. Only this server can make
one, and it names the moment this boot's firmware asked for its script.

The agent API asks for one before it replaces a node's agent session (a reboot): the ticket must
be younger than the ticket lifetime, and younger than both the current session and its last
heartbeat, so it proves that a boot script was fetched after the old agent fell silent, and one
ticket serves one session only. Fetching a script changes nothing in the registry; a ticket is
worth something only once the node's current agent has stopped heartbeating.

The boot network is trusted to carry firmware (kernels travel over plain HTTP): a ticket proves
freshness, not the hardware's identity, and someone who can read a node's boot traffic can read
its ticket. What it closes is the takeover of a live node by anyone who merely knows its MAC.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

# A 96-bit tag: a ticket must fit in iPXE's 512 bytes for all multiboot command lines.
_TICKET = re.compile(r"([0-9a-f]{1,16})\.([A-Za-z0-9_-]{16})")


def _tag(key: bytes, mac: str, issued_ms: int) -> str:
    digest = hmac.new(key, f"boot-ticket|{mac}|{issued_ms}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:12]).decode()


def issue_ticket(key: bytes, mac: str, now: float) -> str:
    """The ticket for a boot script rendered for ``mac`` at ``now``."""
    issued_ms = int(now * 1000)
    return f"{issued_ms:x}.{_tag(key, mac, issued_ms)}"


def ticket_time(key: bytes, mac: str, ticket: str) -> float | None:
    """When a genuine ticket of ``mac`` was issued (seconds); None if it is not one."""
    match = _TICKET.fullmatch(ticket)
    if match is None:
        return None
    issued_ms = int(match.group(1), 16)
    if not hmac.compare_digest(match.group(2), _tag(key, mac, issued_ms)):
        return None
    return issued_ms / 1000
