"""Events the sans-IO cores hand to the asyncio shell."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Send:
    """Write these bytes to the peer this core talks to."""

    data: bytes


@dataclass(frozen=True)
class Close:
    """Close the connection once everything sent so far is flushed."""

    reason: str = ""


@dataclass(frozen=True)
class LoginRequest:
    """A client asks to log in: the shell checks the password, gets a token and logs in upstream."""

    username: str
    password: str = field(repr=False)
    mechanism: str  # "LOGIN", "PLAIN", "USER/PASS": for logs only


@dataclass(frozen=True)
class StartTls:
    """Upgrade the upstream connection to TLS now, then call the core's ``tls_established``."""


@dataclass(frozen=True)
class AcceptTls:
    """The client asked for STARTTLS/STLS: stop reading, send ``reply`` (the go-ahead), do the
    server side of the TLS handshake, then call the core's ``tls_established``. ``dropped``:
    bytes the client had pipelined after the command, which the core discarded."""

    reply: bytes
    dropped: int


@dataclass(frozen=True)
class ReadyToAuthenticate:
    """The upstream's capabilities are known: call ``authenticate(token)``."""


@dataclass(frozen=True)
class LoggedIn:
    """Upstream login succeeded; ``trailing`` is data the server sent after its reply."""

    capabilities: str | None
    trailing: bytes


@dataclass(frozen=True)
class Rejected:
    """The upstream refused the token; ``temporary`` when the server said to try again later."""

    text: str
    temporary: bool
    challenge: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UpstreamFailed:
    """The upstream broke the protocol, said BYE, or cannot do what we need."""

    reason: str
    # What the server lacks for good ("mechanism": no usable OAuth2 SASL mechanism,
    # "starttls": STARTTLS missing or refused); "" when trying again may help.
    lacks: str = field(default="", compare=False)


Event = Send | Close | LoginRequest | StartTls | AcceptTls | ReadyToAuthenticate | LoggedIn \
    | Rejected | UpstreamFailed
