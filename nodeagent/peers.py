"""Who is on the other end of a TLS connection: the netboot identity in a verified peer
certificate. Stdlib only, so that a short-lived helper (``migratestream``) starts fast."""

from __future__ import annotations

from typing import Any

IDENTITY_URN = "urn:netboot:"


def peer_identity(peercert: dict[str, Any] | None) -> str | None:
    """The netboot identity (``urn:netboot:<kind>:...``) of a verified client certificate."""
    for kind, value in (peercert or {}).get("subjectAltName", ()):
        if kind == "URI" and isinstance(value, str) and value.startswith(IDENTITY_URN):
            return value
    return None


__all__ = ["IDENTITY_URN", "peer_identity"]
