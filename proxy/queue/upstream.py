"""What a delivery worker needs from the upstream, as two small protocols: a ``Deliverer``
opens a logged-in ``UpstreamSession`` for an account, which sends one message at a time and
says what the server answered (``Attempt``). ``deliver.py`` is the real one; tests use a fake.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from typing import Protocol

from ..config import Account


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {' '.join(self.text.split())}"

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code >= 500


@dataclass
class Attempt:
    """What the upstream said to one message: MAIL, each RCPT, and the end of data (None
    when no recipient was accepted, so no DATA was sent)."""

    mail: Reply
    recipients: dict[str, Reply] = field(default_factory=dict)
    data: Reply | None = None


class SessionLost(Exception):
    """The upstream connection broke; whatever was in flight was not delivered."""


class SessionRefused(Exception):
    """No logged-in session now. ``authorization``: the account needs a person first."""

    def __init__(self, text: str, *, authorization: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.authorization = authorization


class UpstreamSession(Protocol):
    async def send(self, sender: str, mail_options: list[str], recipients: list[str],
                   body: AsyncIterable[bytes]) -> Attempt:
        """One transaction; ``sender`` "" is the null sender, ``body`` the stored message
        (dot-stuffed, without the end marker). Raises ``SessionLost``."""
        ...

    async def reset(self) -> None:
        """RSET; raises ``SessionLost``."""
        ...

    async def close(self) -> None: ...


class Deliverer(Protocol):
    async def open(self, account: Account) -> UpstreamSession:
        """A logged-in session for the account; raises ``SessionRefused``."""
        ...

    def waiting_for(self, account: Account) -> str | None:
        """Why the account cannot send now without a person (not authorized, vault locked),
        or None. Cheap: no network."""
        ...
