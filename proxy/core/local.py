"""What the IMAP and POP3 local (client-side) cores share: the pre-login states, input
buffering, STARTTLS/STLS, the pending login and its outcome, failed-login counting, PLAIN and
closing."""

from __future__ import annotations

from enum import Enum, auto
from typing import ClassVar

from .events import AcceptTls, Close, Event, LoginRequest, Send
from .sasl import SaslError, decode_plain
from .tlsoffer import TlsOffer

# Client errors a connection may make before login before it is closed: a client that sends
# junk and never reads must not make the daemon answer (and buffer) without end.
MAX_BAD_COMMANDS = 10


class State(Enum):
    COMMAND = auto()  # reading a command line
    LITERAL = auto()  # IMAP only: reading the bytes of a {n} literal
    SASL = auto()  # waiting for the client's AUTHENTICATE / AUTH PLAIN response line
    LOGIN = auto()  # the shell is logging in; input is buffered
    TLS = auto()  # the shell is doing the TLS handshake after STARTTLS/STLS
    DONE = auto()  # logged in: the rest is relayed
    CLOSED = auto()


class ClientError(Exception):
    """A client mistake with the reply that explains it (IMAP: without the tag). ``fatal``:
    the stream cannot be resynced, so the connection closes after the reply."""

    def __init__(self, reply: str, *, fatal: bool = False) -> None:
        super().__init__(reply)
        self.reply = reply
        self.fatal = fatal


class LocalDialogue:
    """Base of the pre-login cores. A subclass parses its protocol in ``_process`` and says
    how its replies look; the login handling and its hand-over are the same for both."""

    # The protocol's words: error prefix, replies to a cancelled SASL exchange and to an
    # authzid, what to send when the client idles out or fails too often ("": nothing).
    ERROR: ClassVar[str]
    CANCELLED: ClassVar[str]
    AUTHZID_REFUSED: ClassVar[str]
    IDLE_BYE: ClassVar[str]
    FAILURES_BYE: ClassVar[str]
    INVALID_BYE: ClassVar[str]  # after too many invalid commands

    def __init__(self, *, max_auth_failures: int = 5,
                 max_bad_commands: int = MAX_BAD_COMMANDS, tls: TlsOffer | None = None) -> None:
        self.max_auth_failures = max_auth_failures
        self.max_bad_commands = max_bad_commands
        self.tls = tls if tls is not None else TlsOffer()
        self.state = State.COMMAND
        self._buf = bytearray()
        self._failures = 0
        self._bad = 0

    def receive(self, data: bytes) -> list[Event]:
        if self.state in (State.TLS, State.DONE, State.CLOSED):
            raise RuntimeError(f"receive() in state {self.state.name}")
        self._buf += data
        return self._process()

    def timeout(self) -> list[Event]:
        """The client stayed silent too long before logging in."""
        return self._close(self.IDLE_BYE, "idle")

    # -- outcomes (from the shell) ---------------------------------------------------------

    def tls_established(self) -> list[Event]:
        """The handshake after STARTTLS/STLS succeeded: read commands again, under TLS (the
        client asks for the capabilities again; the old answer no longer holds)."""
        if self.state is not State.TLS:
            raise RuntimeError(f"no STARTTLS pending (state {self.state.name})")
        self.tls.active = True
        self.state = State.COMMAND
        return self._process()

    def _begin_tls(self, go_ahead: str) -> list[Event]:
        """Answer STARTTLS/STLS with ``go_ahead`` through the shell, which upgrades."""
        # Whatever came after the command line was sent without waiting for our answer: it
        # must never run as a command under TLS (the STARTTLS command injection class).
        dropped, self._buf = len(self._buf), bytearray()
        self.state = State.TLS
        return [AcceptTls(go_ahead.encode(), dropped)]

    def login_rejected(self, reply: str) -> list[Event]:
        """Answer the pending login with ``reply`` (e.g. ``NO [UNAVAILABLE] ...``)."""
        self._expect_login()
        self.state = State.COMMAND
        events: list[Event] = [Send(self._reply_line(reply))]
        self._failures += 1
        if self._failures >= self.max_auth_failures:
            return events + self._close(self.FAILURES_BYE, "auth failures")
        return events + self._process()

    def login_accepted(self, capabilities: str | None = None) -> tuple[bytes, bytes]:
        """The reply for the client and the bytes it sent after its login command."""
        self._expect_login()
        self.state = State.DONE
        trailing, self._buf = bytes(self._buf), bytearray()
        return self._welcome(capabilities), trailing

    # -- for the subclasses ----------------------------------------------------------------

    def _process(self) -> list[Event]:
        """Consume what ``_buf`` holds while the state allows it."""
        raise NotImplementedError

    def _command(self, line: bytes) -> list[Event]:
        """A command line (CRLF removed)."""
        raise NotImplementedError

    def _error(self, exc: ClientError) -> list[Event]:
        """Answer a client mistake (and close if it is fatal)."""
        raise NotImplementedError

    def _line(self, end: int) -> list[Event]:
        """Take the line that ends at ``_buf[end]`` (a LF) and answer it."""
        line = bytes(self._buf[:end]).removesuffix(b"\r")
        del self._buf[: end + 1]
        try:
            if self.state is State.SASL:
                return self._sasl_response(line)
            return self._command(line)
        except ClientError as exc:
            self._bad += 1
            if self._bad >= self.max_bad_commands and not exc.fatal:
                return self._too_many(exc)
            return self._error(exc)

    def _too_many(self, exc: ClientError) -> list[Event]:
        """Answer the last invalid command allowed, and close."""
        return self._error(exc) + self._close(self.INVALID_BYE, "invalid commands")

    def _reply_line(self, reply: str) -> bytes:
        """The line that carries the reply to the pending command."""
        raise NotImplementedError

    def _welcome(self, capabilities: str | None) -> bytes:
        """The reply to a successful login."""
        raise NotImplementedError

    def _sasl_response(self, line: bytes) -> list[Event]:
        self.state = State.COMMAND
        if line.strip() == b"*":
            raise ClientError(self.CANCELLED)
        return self._plain(line)

    def _plain(self, raw: bytes) -> list[Event]:
        try:
            creds = decode_plain(raw)
        except SaslError as exc:
            raise ClientError(f"{self.ERROR} Invalid PLAIN response: {exc}") from None
        if creds.authzid and creds.authzid != creds.username:
            raise ClientError(self.AUTHZID_REFUSED)
        return self._login(creds.username, creds.password, "PLAIN")

    def _login(self, user: str, password: str, mechanism: str) -> list[Event]:
        self.state = State.LOGIN
        return [LoginRequest(user, password, mechanism)]

    def _expect_login(self) -> None:
        if self.state is not State.LOGIN:
            raise RuntimeError(f"no login pending (state {self.state.name})")

    def _close(self, text: str, reason: str) -> list[Event]:
        self.state = State.CLOSED
        self._buf.clear()
        events: list[Event] = [Send(text.encode())] if text else []
        return [*events, Close(reason)]
