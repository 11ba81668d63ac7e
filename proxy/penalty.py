"""Password guessing: a per-address failure delay that doubles (Dovecot's auth penalty), and
failure limits per address and per account within a window. Pure bookkeeping with an injected
clock; ``Gate`` asks it before and tells it after each password check."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from .config import AuthSettings

# Bookkeeping for this many addresses/accounts at most: the oldest are forgotten first.
MAX_TRACKED = 10000


@dataclass
class _Record:
    failures: deque[float] = field(default_factory=deque)  # times, oldest first
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0


class Penalty:
    """What a peer's and an account's recent failures cost the next login."""

    def __init__(self, settings: AuthSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._peers: dict[str, _Record] = {}
        self._accounts: dict[str, deque[float]] = {}

    def _recent(self, times: deque[float]) -> int:
        horizon = self._clock() - self.settings.failure_window
        while times and times[0] < horizon:
            times.popleft()
        return len(times)

    def failures(self, peer: str) -> int:
        record = self._peers.get(peer)
        return 0 if record is None else self._recent(record.failures)

    def delay(self, peer: str) -> float:
        """Seconds the next login from ``peer`` waits: 0, then the base doubling per recent
        failure, capped."""
        n = self.failures(peer)
        if n == 0 or self.settings.failure_delay <= 0:
            return 0.0
        return min(self.settings.failure_delay * 2.0 ** min(n - 1, 30),
                   self.settings.failure_delay_max)

    def peer_blocked(self, peer: str) -> bool:
        return self.failures(peer) >= self.settings.max_failures_per_ip

    def account_blocked(self, account_key: str) -> bool:
        times = self._accounts.get(account_key)
        return times is not None and \
            self._recent(times) >= self.settings.max_failures_per_account

    @asynccontextmanager
    async def turn(self, peer: str) -> AsyncIterator[None]:
        """One password check at a time per peer (parallel connections do not multiply its
        guesses nor its share of the CPU), each after the peer's delay."""
        record = self._peers.get(peer)
        if record is None:
            record = self._peers[peer] = _Record()
        record.waiting += 1
        try:
            async with record.lock:
                delay = self.delay(peer)
                if delay:
                    await asyncio.sleep(delay)
                yield
        finally:
            record.waiting -= 1
            if not record.waiting and not record.failures:
                self._peers.pop(peer, None)

    def failed(self, peer: str, account_key: str | None) -> None:
        now = self._clock()
        record = self._peers.pop(peer, None) or _Record()
        self._peers[peer] = record  # most recent last: trimming drops the oldest
        record.failures.append(now)
        if account_key is not None:
            times = self._accounts.pop(account_key, None) or deque()
            self._accounts[account_key] = times
            times.append(now)
        self._trim()

    def succeeded(self, peer: str) -> None:
        record = self._peers.get(peer)
        if record is not None:
            record.failures.clear()
            if not record.waiting:
                del self._peers[peer]

    def _trim(self) -> None:
        for table in (self._peers, self._accounts):
            while len(table) > MAX_TRACKED:
                oldest = next(iter(table))
                value = table[oldest]
                if isinstance(value, _Record) and value.waiting:
                    break
                del table[oldest]
