"""Logged-in upstream SMTP sessions kept per account between client connections, so a device
that sends one message per connection does not pay the upstream login (TCP, TLS, EHLO,
AUTH: about five round trips) each time. A session is handed back only when it is idle (no
transaction open upstream) and is dropped after ``idle_timeout`` seconds unused."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Pooled(Protocol):
    @property
    def connected(self) -> bool: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=Pooled)

IDLE_TIMEOUT = 60.0
PER_ACCOUNT = 4


class SessionPool(Generic[S]):
    def __init__(self, *, idle_timeout: float = IDLE_TIMEOUT, per_account: int = PER_ACCOUNT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_timeout = idle_timeout
        self.per_account = per_account
        self.clock = clock
        self._idle: dict[str, collections.deque[tuple[float, S]]] = {}
        self.hits = 0
        self.misses = 0

    def take(self, account_key: str) -> S | None:
        """A logged-in idle session of the account, most recently used first, or None."""
        sessions = self._idle.get(account_key)
        now = self.clock()
        while sessions:
            since, session = sessions.pop()
            if now - since < self.idle_timeout and session.connected:
                self.hits += 1
                return session
            session.close()
        self.misses += 1
        return None

    def give(self, account_key: str, session: S) -> None:
        """Keep ``session`` (idle, logged in) for the next client of the account."""
        if not session.connected or self.idle_timeout <= 0:
            session.close()
            return
        sessions = self._idle.setdefault(account_key, collections.deque())
        sessions.append((self.clock(), session))
        while len(sessions) > self.per_account:
            sessions.popleft()[1].close()

    def expire(self) -> None:
        """Close the sessions idle for too long (or closed by the server meanwhile)."""
        now = self.clock()
        for key, sessions in list(self._idle.items()):
            kept = collections.deque(
                (since, s) for since, s in sessions
                if now - since < self.idle_timeout and s.connected)
            for since, s in sessions:
                if (since, s) not in kept:
                    s.close()
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]

    def drop(self, account_key: str) -> None:
        """Close the account's idle sessions (its grant was revoked, a reload changed it)."""
        for _, session in self._idle.pop(account_key, ()):
            session.close()

    def accounts(self) -> list[str]:
        """The keys of the accounts that have idle sessions."""
        return list(self._idle)

    def idle(self, account_key: str) -> int:
        return len(self._idle.get(account_key, ()))

    async def run(self, interval: float = 10.0) -> None:
        """Expire idle sessions until cancelled (owned by the daemon's task group)."""
        try:
            while True:
                await asyncio.sleep(interval)
                self.expire()
        finally:
            self.close()

    def close(self) -> None:
        for sessions in self._idle.values():
            for _, session in sessions:
                session.close()
        self._idle.clear()
