"""The client side of a POP3 session before login, as a sans-IO state machine.

Feed bytes with ``receive``; get back events: bytes to send, a login to carry out, a close.
Once the shell reports the upstream login with ``login_accepted`` the core is done and hands
over every byte it buffered but did not consume (pipelined commands), to be relayed untouched.
"""

from __future__ import annotations

from enum import Enum, auto

from .events import Close, Event, LoginRequest, Send
from .sasl import SaslError, decode_plain

# Not PIPELINING: the commands a client pipelines after login go to the server, which may not
# offer it (Gmail does not). After login the server's own CAPA answer is relayed.
CAPABILITIES = ("USER", "SASL PLAIN", "RESP-CODES", "AUTH-RESP-CODE", "IMPLEMENTATION mailproxy")
ACCEPTED = "CAPA, USER, PASS, AUTH PLAIN and QUIT"

# RFC 2449 section 4: a command line is at most 255 octets, CRLF included.
MAX_LINE = 255
# RFC 5034 section 4: the 255-octet limit binds the AUTH command (so a long initial response
# must go on its own line), but a client's response line is only bounded by the mechanism.
# PLAIN (RFC 4616) has authzid, authcid and password of at most 255 octets each: 767 octets,
# 1024 in base64, plus CRLF.
MAX_SASL_LINE = 1026


class State(Enum):
    COMMAND = auto()  # reading a command line
    SASL = auto()  # waiting for the client's AUTH PLAIN response line
    LOGIN = auto()  # the shell is logging in; input is buffered
    DONE = auto()  # logged in: the rest is relayed
    CLOSED = auto()


class ClientError(Exception):
    """A client mistake with the ``-ERR`` reply that explains it."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ClientError(f"-ERR {what} must be UTF-8") from None


class Pop3Local:
    """Pre-login POP3 server dialogue (AUTHORIZATION state). One instance per connection."""

    def __init__(self, *, max_auth_failures: int = 5) -> None:
        self.max_auth_failures = max_auth_failures
        self.state = State.COMMAND
        self._buf = bytearray()
        self._user: str | None = None
        self._failures = 0

    def greeting(self) -> bytes:
        return b"+OK mailproxy ready\r\n"

    # -- input -----------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        if self.state in (State.DONE, State.CLOSED):
            raise RuntimeError(f"receive() in state {self.state.name}")
        self._buf += data
        return self._process()

    def timeout(self) -> list[Event]:
        """The client stayed silent too long before logging in."""
        return self._close("-ERR Disconnected: idle for too long before login\r\n", "idle")

    def _process(self) -> list[Event]:
        events: list[Event] = []
        while self.state in (State.COMMAND, State.SASL):
            limit = MAX_SASL_LINE if self.state is State.SASL else MAX_LINE
            end = self._buf.find(b"\n")
            # Without a LF yet, a buffer of `limit` octets is already a line of limit + 1.
            if (end < 0 and len(self._buf) >= limit) or end + 1 > limit:
                what = "an AUTH response line" if self.state is State.SASL else \
                    "a POP3 command line"
                events += self._close(f"-ERR Line too long: {what} is limited to {limit} "
                                      "octets\r\n", "line too long")
                break
            if end < 0:
                break
            line = bytes(self._buf[:end]).removesuffix(b"\r")
            del self._buf[: end + 1]
            try:
                if self.state is State.SASL:
                    events += self._sasl_response(line)
                else:
                    events += self._command(line)
            except ClientError as exc:
                self.state = State.COMMAND
                events.append(Send(f"{exc.reply}\r\n".encode()))
        return events

    # -- commands --------------------------------------------------------------------------

    def _command(self, line: bytes) -> list[Event]:
        keyword, _, rest = line.partition(b" ")
        if not keyword:
            raise ClientError("-ERR Empty command line")
        if not keyword.isalpha() or not keyword.isascii() or len(keyword) > 4:
            raise ClientError("-ERR Not a POP3 command")
        command = keyword.decode("ascii").upper()
        if command == "CAPA":
            lines = "".join(f"{c}\r\n" for c in CAPABILITIES)
            return [Send(f"+OK Capability list follows\r\n{lines}.\r\n".encode())]
        if command == "USER":
            user = _utf8(rest, "The user name").strip()
            if not user:
                raise ClientError("-ERR USER expects a user name (your e-mail address)")
            self._user = user
            return [Send(b"+OK Send PASS\r\n")]
        if command == "PASS":
            # RFC 1939: the whole rest of the line is the password, spaces included.
            if self._user is None:
                raise ClientError("-ERR Send USER first")
            user, self._user = self._user, None
            return self._login(user, _utf8(rest, "The password"), "USER/PASS")
        if command == "AUTH":
            return self._auth(rest.split())
        if command == "QUIT":
            return self._close("+OK mailproxy signing off\r\n", "quit")
        if command == "STLS":
            raise ClientError("-ERR STLS is not available: this listener has no TLS "
                              "configured; connect without TLS (it listens on this machine only)")
        if command == "APOP":
            raise ClientError("-ERR APOP is not supported: use USER/PASS or AUTH PLAIN with the "
                              "local password")
        raise ClientError(f"-ERR {command} is not accepted before login; log in first "
                          f"(accepted now: {ACCEPTED})")

    def _auth(self, args: list[bytes]) -> list[Event]:
        self._user = None
        if not args:  # RFC 1734 style: list the mechanisms
            return [Send(b"+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n")]
        mechanism = args[0].decode("ascii", "replace").upper()
        if mechanism != "PLAIN":
            raise ClientError(f"-ERR Unsupported mechanism {mechanism}: only AUTH PLAIN (or "
                              "USER/PASS) is accepted here")
        if len(args) > 2:
            raise ClientError("-ERR AUTH PLAIN takes at most one initial response")
        if len(args) == 2:
            return self._plain(args[1])
        self.state = State.SASL
        return [Send(b"+ \r\n")]

    def _sasl_response(self, line: bytes) -> list[Event]:
        self.state = State.COMMAND
        if line.strip() == b"*":
            raise ClientError("-ERR AUTH cancelled")
        return self._plain(line)

    def _plain(self, raw: bytes) -> list[Event]:
        try:
            creds = decode_plain(raw)
        except SaslError as exc:
            raise ClientError(f"-ERR Invalid PLAIN response: {exc}") from None
        if creds.authzid and creds.authzid != creds.username:
            raise ClientError("-ERR [AUTH] Acting as another user (authzid) is not supported")
        return self._login(creds.username, creds.password, "PLAIN")

    def _login(self, user: str, password: str, mechanism: str) -> list[Event]:
        self.state = State.LOGIN
        return [LoginRequest(user, password, mechanism)]

    # -- login outcome (from the shell) ----------------------------------------------------

    def login_rejected(self, reply: str) -> list[Event]:
        """Answer the pending login with ``reply`` (e.g. ``-ERR [SYS/TEMP] ...``)."""
        self._expect_login()
        self.state = State.COMMAND
        events: list[Event] = [Send(f"{reply}\r\n".encode())]
        self._failures += 1
        if self._failures >= self.max_auth_failures:
            # No second -ERR: a POP3 client would take it as the answer to its next command.
            return events + self._close("", "auth failures")
        return events + self._process()

    def login_accepted(self, capabilities: str | None = None) -> tuple[bytes, bytes]:
        """The reply for the client and the bytes it sent after its login command.

        ``capabilities`` is unused: a POP3 +OK cannot carry them; the client asks CAPA.
        """
        self._expect_login()
        self.state = State.DONE
        trailing, self._buf = bytes(self._buf), bytearray()
        return b"+OK Logged in\r\n", trailing

    def _expect_login(self) -> None:
        if self.state is not State.LOGIN:
            raise RuntimeError(f"no login pending (state {self.state.name})")

    def _close(self, text: str, reason: str) -> list[Event]:
        self.state = State.CLOSED
        self._buf.clear()
        events: list[Event] = [Send(text.encode())] if text else []
        return [*events, Close(reason)]
