"""Sending limits per account (messages per minute and per day, recipients per day): how long
the delivery worker must wait before the next message. Pure logic on an explicit clock."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass

MINUTE = 60.0
DAY = 86400.0


@dataclass(frozen=True)
class Limits:
    messages_per_minute: int | None = None
    messages_per_day: int | None = None
    recipients_per_day: int | None = None

    @property
    def any(self) -> bool:
        return any((self.messages_per_minute, self.messages_per_day, self.recipients_per_day))


class RateLimiter:
    """Sliding windows over what was sent (time, recipients) in the last day."""

    def __init__(self, limits: Limits, history: Iterable[tuple[float, int]] = ()) -> None:
        self.limits = limits
        self._sent: collections.deque[tuple[float, int]] = collections.deque(sorted(history))
        self._recipients = sum(n for _, n in self._sent)

    def _prune(self, now: float) -> None:
        while self._sent and self._sent[0][0] <= now - DAY:
            _, n = self._sent.popleft()
            self._recipients -= n

    def delay(self, now: float, recipients: int) -> float:
        """Seconds until a message to ``recipients`` recipients may go (0: now).

        A message with more recipients than the daily limit goes once the window is empty
        (it could never fit otherwise; the provider then decides).
        """
        self._prune(now)
        limits, sent = self.limits, self._sent
        wait = 0.0
        per_minute = limits.messages_per_minute
        if per_minute:
            recent = 0
            for at, _ in reversed(sent):
                if at <= now - MINUTE:
                    break
                recent += 1
                if recent >= per_minute:  # this one must leave the window first
                    wait = max(wait, at + MINUTE - now)
                    break
        per_day = limits.messages_per_day
        if per_day and len(sent) >= per_day:
            wait = max(wait, sent[len(sent) - per_day][0] + DAY - now)
        cap = limits.recipients_per_day
        if cap and self._recipients + recipients > cap:
            need = self._recipients + recipients - cap if recipients <= cap else self._recipients
            freed = 0
            for at, n in sent:
                freed += n
                if freed >= need:
                    wait = max(wait, at + DAY - now)
                    break
        return max(wait, 0.0)

    def record(self, now: float, recipients: int) -> None:
        self._sent.append((now, recipients))
        self._recipients += recipients
