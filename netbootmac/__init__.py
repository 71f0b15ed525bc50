"""The one rule for a NIC's MAC address, shared by the config server and the node agent.

Both sides must agree: an agent that accepted a MAC the server refuses would retry its lookup
forever. Each package wraps ``MacError`` into its own exception hierarchy.
"""

from __future__ import annotations

import re

_HEX12 = re.compile(r"^[0-9a-f]{12}$")
_PXELINUX = re.compile(r"^01-([0-9a-f]{2}-){5}[0-9a-f]{2}$")
_SEPARATORS = re.compile(r"[:\-.]")

HINT = "use six hex octets, e.g. 52:54:00:12:34:56"


class MacError(ValueError):
    """Not a unicast 48-bit MAC address; ``hint`` says what is expected."""

    def __init__(self, message: str, hint: str = HINT) -> None:
        super().__init__(message)
        self.hint = hint


def normalize_mac(text: str) -> str:
    """Return ``aa:bb:cc:dd:ee:ff`` for any common spelling of a NIC's 48-bit MAC.

    Accepted: colons, hyphens, Cisco dots (``aabb.ccdd.eeff``), bare hex, any case, and the
    pxelinux ``01-aa-bb-...`` form with its hardware-type prefix. Refused: anything else,
    multicast (and so broadcast) addresses and the all-zero address, none of which a NIC
    sends from.
    """
    if not isinstance(text, str):
        raise MacError(f"MAC address must be a string, not {type(text).__name__}")
    raw = text.strip().lower()
    if _PXELINUX.match(raw):
        raw = raw[3:]
    groups = _SEPARATORS.split(raw)
    well_formed = (
        len(groups) == 1
        or (len(groups) == 6 and all(len(g) in (1, 2) for g in groups))
        or (len(groups) == 3 and all(len(g) == 4 for g in groups))
    )
    compact = "".join(g.zfill(2) for g in groups) if len(groups) == 6 else "".join(groups)
    if not well_formed or not _HEX12.match(compact):
        raise MacError(f"invalid MAC address {text!r}")
    if int(compact[:2], 16) & 1:
        raise MacError(f"{text!r} is a multicast address, not a NIC's MAC",
                       hint="a NIC's MAC has the low bit of its first octet clear")
    if compact == "000000000000":
        raise MacError("the all-zero MAC address is not a NIC's MAC")
    return ":".join(compact[i:i + 2] for i in range(0, 12, 2))


__all__ = ["MacError", "normalize_mac"]
