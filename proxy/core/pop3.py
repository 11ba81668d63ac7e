"""The client side of a POP3 session before login, as a sans-IO state machine.

Feed bytes with ``receive``; get back events: bytes to send, a login to carry out, a close.
Once the shell reports the upstream login with ``login_accepted`` the core is done and hands
over every byte it buffered but did not consume (pipelined commands), to be relayed untouched.
"""

from __future__ import annotations

import re

from .events import Event, Send
from .local import ClientError, LocalDialogue, State
from .tlsoffer import TlsOffer

__all__ = ["ACCEPTED", "CAPABILITIES", "MAX_LINE", "MAX_SASL_LINE", "ClientError", "Pop3Local",
           "State"]

# Not PIPELINING: the commands a client pipelines after login go to the server, which may not
# offer it (Gmail does not). After login the server's own CAPA answer is relayed.
CAPABILITIES = ("USER", "SASL PLAIN", "RESP-CODES", "AUTH-RESP-CODE", "IMPLEMENTATION mailproxy")
ACCEPTED = "CAPA, USER, PASS, AUTH PLAIN and QUIT"
PRIVACY_REQUIRED = ("-ERR Passwords are not accepted in the clear here: send STLS first (or "
                    "use the implicit-TLS port)")

# RFC 2449 section 4: a command line is at most 255 octets, CRLF included.
MAX_LINE = 255
# RFC 5034 section 4: the 255-octet limit binds the AUTH command (so a long initial response
# must go on its own line), but a client's response line is only bounded by the mechanism.
# PLAIN (RFC 4616) has authzid, authcid and password of at most 255 octets each: 767 octets,
# 1024 in base64, plus CRLF.
MAX_SASL_LINE = 1026
_WORD = re.compile(rb"[A-Za-z0-9._-]{1,40}")


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ClientError(f"-ERR {what} must be UTF-8") from None


class Pop3Local(LocalDialogue):
    """Pre-login POP3 server dialogue (AUTHORIZATION state). One instance per connection."""

    ERROR = "-ERR"
    CANCELLED = "-ERR AUTH cancelled"
    AUTHZID_REFUSED = "-ERR [AUTH] Acting as another user (authzid) is not supported"
    IDLE_BYE = "-ERR Disconnected: idle for too long before login\r\n"
    # No second -ERR: a POP3 client would take it as the answer to its next command.
    FAILURES_BYE = ""
    INVALID_BYE = ""

    def __init__(self, *, max_auth_failures: int = 5, tls: TlsOffer | None = None) -> None:
        super().__init__(max_auth_failures=max_auth_failures, tls=tls)
        self._user: str | None = None

    def greeting(self) -> bytes:
        return b"+OK mailproxy ready\r\n"

    def capabilities(self) -> list[str]:
        """CAPA now: STLS while it can start, no USER/SASL while passwords wait for TLS."""
        words = list(CAPABILITIES)
        if not self.tls.passwords_allowed:
            words = [w for w in words if w not in ("USER", "SASL PLAIN")]
        if self.tls.can_start:
            words.insert(0, "STLS")
        return words

    # -- input -----------------------------------------------------------------------------

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
            events += self._line(end)
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
            lines = "".join(f"{c}\r\n" for c in self.capabilities())
            return [Send(f"+OK Capability list follows\r\n{lines}.\r\n".encode())]
        if command in ("USER", "PASS", "AUTH") and not self.tls.passwords_allowed:
            self._user = None
            raise ClientError(PRIVACY_REQUIRED)
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
        if command == "STLS" and self.tls.active:
            raise ClientError("-ERR Command not permitted when TLS active")
        if command == "STLS" and self.tls.available:
            self._user = None
            return self._begin_tls("+OK Begin TLS negotiation\r\n")
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
            # Echoed only when it looks like a mechanism name: never control or 8-bit bytes.
            what = f"mechanism {mechanism}" if _WORD.fullmatch(args[0]) else "mechanism"
            raise ClientError(f"-ERR Unsupported {what}: only AUTH PLAIN (or USER/PASS) is "
                              "accepted here")
        if len(args) > 2:
            raise ClientError("-ERR AUTH PLAIN takes at most one initial response")
        if len(args) == 2:
            return self._plain(args[1])
        self.state = State.SASL
        return [Send(b"+ \r\n")]

    # -- replies ---------------------------------------------------------------------------

    def _reply_line(self, reply: str) -> bytes:
        return f"{reply}\r\n".encode()

    def _error(self, exc: ClientError) -> list[Event]:
        self.state = State.COMMAND
        return [Send(self._reply_line(exc.reply))]

    def _too_many(self, exc: ClientError) -> list[Event]:
        # One reply only: a second -ERR would answer the client's next command.
        return self._close(f"{exc.reply} (too many invalid commands, disconnecting)\r\n",
                           "invalid commands")

    def _welcome(self, capabilities: str | None) -> bytes:
        # A POP3 +OK cannot carry capabilities: the client asks CAPA.
        return b"+OK Logged in\r\n"
