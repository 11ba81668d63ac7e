"""What the IMAP and POP3 upstream login cores share: the login's settings and token, its
states, server bytes split into lines, and one verdict per login."""

from __future__ import annotations

import re
from enum import Enum, auto

from .events import Event, StartTls, UpstreamFailed
from .sasl import Mechanism, initial_response

MAX_LINE = 65536
# A response code at the start of a status text: "[UNAVAILABLE] ...", "[SYS/TEMP] ...".
CODE = re.compile(r"^\[([^\]]*)\]\s*")


class State(Enum):
    GREETING = auto()
    STARTTLS = auto()  # STARTTLS (POP3: STLS) sent, waiting for its OK
    TLS = auto()  # the shell is upgrading the connection
    CAPABILITY = auto()  # CAPABILITY (POP3: CAPA) sent
    READY = auto()  # waiting for a token
    AUTH = auto()  # AUTHENTICATE / AUTH sent without the token, waiting for "+"
    AUTH_SENT = auto()  # the token is sent, waiting for the verdict
    DONE = auto()
    FAILED = auto()


# States in which no server data is expected: the login is over, or the shell has the turn.
# A tuple, not a set: members compare by identity, a set would call Enum.__hash__.
_PAUSED = (State.DONE, State.FAILED, State.TLS, State.READY)


class UpstreamLogin:
    """Base of the upstream login cores: buffers server bytes and hands complete lines (CRLF
    removed) to ``_line`` while the login waits for the server."""

    def __init__(self, user: str, *, starttls: bool = False, mechanism: str = "auto",
                 host: str | None = None, port: int | None = None) -> None:
        self.user = user
        self.starttls = starttls
        self.preference = mechanism
        self.host, self.port = host, port
        self.state = State.GREETING
        self.capabilities: frozenset[str] = frozenset()
        self._buf = bytearray()
        self._mechanism: Mechanism = "XOAUTH2"
        self._token = ""
        self._challenge: dict[str, object] = {}

    @property
    def mechanism(self) -> str:
        """The SASL mechanism chosen (or to be chosen) for the login."""
        return self._mechanism

    def receive(self, data: bytes) -> list[Event]:
        if self.state in (State.DONE, State.FAILED):
            raise RuntimeError(f"receive() after the login ended ({self.state.name})")
        self._buf += data
        events: list[Event] = []
        while self.state not in _PAUSED:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_LINE:
                    events.append(self._fail("server sent an over-long line"))
                break
            raw = bytes(self._buf[:end]).removesuffix(b"\r")
            del self._buf[: end + 1]
            events += self._line(raw.decode("utf-8", "replace"))
        return events

    def tls_established(self) -> list[Event]:
        """The shell finished the TLS handshake."""
        raise NotImplementedError

    def authenticate(self, token: str) -> list[Event]:
        """Log in with ``token`` (only in state READY, after ``ReadyToAuthenticate``)."""
        raise NotImplementedError

    def _line(self, line: str) -> list[Event]:
        raise NotImplementedError

    def _start_tls(self, command: str) -> list[Event]:
        """The server accepted ``command`` (STARTTLS, STLS): hand over to the shell for the
        handshake. Anything already sent after the OK would be injected: fail instead."""
        if self._buf:
            return [self._fail(f"server sent data after accepting {command}")]
        self.state = State.TLS
        return [StartTls()]

    def _logged_in(self) -> bytes:
        """The login succeeded: the core is done; returns what the server sent after it."""
        self.state = State.DONE
        trailing, self._buf = bytes(self._buf), bytearray()
        return trailing

    def _response(self) -> bytes:
        return initial_response(self._mechanism, self.user, self._token, self.host, self.port)

    def _fail(self, reason: str, lacks: str = "") -> UpstreamFailed:
        self.state = State.FAILED
        self._token = ""
        return UpstreamFailed(reason, lacks)
