"""Browser sessions of the dashboard: single-use login links and the sessions they open.

A browser has no client certificate in the common case, and the API takes no password. An
admin who has one of the API's own credentials (an admin certificate, or root on the config
server through its unix socket) mints a login link (``configserver dashboard login``); the
link's token is good once, for ``LINK_LIFETIME`` seconds. Opening it trades the token for a
session: a random id in an ``HttpOnly; Secure; SameSite=Strict`` cookie, naming the admin who
minted the link, good for ``SESSION_LIFETIME`` seconds, plus a CSRF token that the page sends
in a header with every request that changes something.

Only SHA-256 hashes of tokens and session ids are kept, in this process's memory: a restart of
the server ends every session (the admin mints a new link). A session ends early when the
certificate that minted it is revoked (the caller checks ``Session.serial`` against the CRL).
Bounded: at most ``MAX_LINKS`` unused links and ``MAX_SESSIONS`` sessions, the oldest go first.
Use it on the event loop only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from configserver.pki.identity import Identity

LINK_LIFETIME = 120.0  # seconds a login link may wait to be opened
SESSION_LIFETIME = 12 * 3600.0
MAX_LINKS = 64
MAX_SESSIONS = 256
COOKIE = "netboot_session"
CSRF_HEADER = "X-CSRF-Token"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    identity: Identity
    csrf: str
    created: float
    expires: float
    serial: int | None  # the minting certificate's serial; None: the local admin (root)

    def csrf_matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.csrf.encode())


@dataclass(frozen=True)
class _Link:
    identity: Identity
    serial: int | None
    expires: float


class WebSessions:
    def __init__(self, clock: Callable[[], float] = time.time, *,
                 link_lifetime: float = LINK_LIFETIME,
                 session_lifetime: float = SESSION_LIFETIME) -> None:
        self.clock = clock
        self.link_lifetime = link_lifetime
        self.session_lifetime = session_lifetime
        self._links: OrderedDict[str, _Link] = OrderedDict()
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def mint_link(self, identity: Identity, serial: int | None) -> tuple[str, float]:
        """A new single-use login token for ``identity`` and when it expires."""
        if not identity.is_admin:
            raise ValueError("only admins open dashboard sessions")
        self._expire()
        token = secrets.token_urlsafe(32)
        expires = self.clock() + self.link_lifetime
        self._links[_digest(token)] = _Link(identity, serial, expires)
        while len(self._links) > MAX_LINKS:
            self._links.popitem(last=False)
        return token, expires

    def redeem(self, token: str) -> tuple[str, Session] | None:
        """Trade a login token for a new session (its cookie value and the session), once."""
        self._expire()
        link = self._links.pop(_digest(token), None)
        if link is None:
            return None
        now = self.clock()
        session_id = secrets.token_urlsafe(32)
        session = Session(link.identity, secrets.token_urlsafe(24), now,
                          now + self.session_lifetime, link.serial)
        self._sessions[_digest(session_id)] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session_id, session

    def session(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        key = _digest(session_id)
        session = self._sessions.get(key)
        if session is not None and session.expires <= self.clock():
            del self._sessions[key]
            return None
        return session

    def end(self, session_id: str | None) -> bool:
        return bool(session_id) and self._sessions.pop(_digest(session_id), None) is not None

    def end_revoked(self, serials: set[int] | frozenset[int]) -> int:
        """End the sessions whose minting certificate is revoked; how many ended."""
        gone = [k for k, s in self._sessions.items() if s.serial is not None
                and s.serial in serials]
        for key in gone:
            del self._sessions[key]
        return len(gone)

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self) -> None:
        now = self.clock()
        for store in (self._links, self._sessions):
            for key in [k for k, v in store.items() if v.expires <= now]:
                del store[key]


__all__ = ["COOKIE", "CSRF_HEADER", "Session", "WebSessions"]
