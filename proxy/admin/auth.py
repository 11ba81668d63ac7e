"""Who may use the admin page: one-time sign-in links, sessions and CSRF tokens.

Pure bookkeeping with an injected clock (no I/O). Secrets are kept only as SHA-256 digests, so
a memory dump or a debugger's repr of these tables gives nobody a working link or cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# A sign-in link works once, within this many seconds of being printed.
LINK_LIFETIME = 300.0
# A session ends after this long without a request, and in any case after MAX_AGE.
IDLE_TIMEOUT = 30 * 60.0
MAX_AGE = 12 * 3600.0
# Outstanding links and sessions kept at most (oldest dropped): bounded memory whatever happens.
MAX_LINKS = 32
MAX_SESSIONS = 64


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


@dataclass
class Session:
    csrf: str = field(repr=False)
    created: float
    seen: float
    # What a page shows once and then forgets: account key -> [(kind, text)], kind "password"
    # (a generated local password) or "note". In the daemon's memory, never a cookie or a URL.
    once: dict[str, list[tuple[str, str]]] = field(default_factory=dict, repr=False)

    def take(self, key: str) -> list[tuple[str, str]]:
        return self.once.pop(key, [])

    def check_csrf(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())


class Gatekeeper:
    def __init__(self, clock: Callable[[], float] = time.time, *,
                 link_lifetime: float = LINK_LIFETIME, idle_timeout: float = IDLE_TIMEOUT,
                 max_age: float = MAX_AGE) -> None:
        self._clock = clock
        self.link_lifetime = link_lifetime
        self._idle = idle_timeout
        self._max_age = max_age
        self._links: dict[bytes, float] = {}  # digest -> expiry
        self._sessions: dict[bytes, Session] = {}  # digest of the cookie value -> session

    def issue_link(self) -> str:
        """A fresh sign-in token (for the URL); it works once, for ``link_lifetime`` seconds."""
        self._prune()
        while len(self._links) >= MAX_LINKS:
            del self._links[min(self._links, key=self._links.__getitem__)]
        token = secrets.token_urlsafe(32)
        self._links[_digest(token)] = self._clock() + self.link_lifetime
        return token

    def redeem(self, token: str) -> tuple[str, Session] | None:
        """Trade a sign-in token for a new session: (cookie value, session); None if the token
        is unknown, used or expired. A token is spent even when it arrives late."""
        expiry = self._links.pop(_digest(token), None)
        now = self._clock()
        if expiry is None or now >= expiry:
            return None
        self._prune()
        while len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions, key=lambda d: self._sessions[d].seen)
            del self._sessions[oldest]
        cookie = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), created=now, seen=now)
        self._sessions[_digest(cookie)] = session
        return cookie, session

    def session(self, cookie: str | None) -> Session | None:
        """The live session for this cookie value (and mark it used), or None."""
        if not cookie:
            return None
        digest = _digest(cookie)
        session = self._sessions.get(digest)
        if session is None:
            return None
        now = self._clock()
        if now - session.seen >= self._idle or now - session.created >= self._max_age:
            del self._sessions[digest]
            return None
        session.seen = now
        return session

    def end(self, cookie: str | None) -> None:
        if cookie:
            self._sessions.pop(_digest(cookie), None)

    def _prune(self) -> None:
        now = self._clock()
        for digest in [d for d, exp in self._links.items() if now >= exp]:
            del self._links[digest]
        for digest in [d for d, s in self._sessions.items()
                       if now - s.seen >= self._idle or now - s.created >= self._max_age]:
            del self._sessions[digest]
