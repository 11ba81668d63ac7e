"""The client side of an IMAP session before login, as a sans-IO state machine.

Feed bytes with ``receive``; get back events: bytes to send, a login to carry out, a close.
Once the shell reports the upstream login with ``login_accepted`` the core is done and hands
over every byte it buffered but did not consume, to be relayed untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import __version__
from .events import Event, Send
from .local import ClientError, LocalDialogue, State
from .tlsoffer import TlsOffer

__all__ = ["ACCEPTED", "CAPABILITIES", "ClientError", "ImapLocal", "State"]

CAPABILITIES = "IMAP4rev1 AUTH=PLAIN SASL-IR ID LITERAL+"
PRIVACY_REQUIRED = ("NO [PRIVACYREQUIRED] Passwords are not accepted in the clear here: use "
                    "STARTTLS first (or the implicit-TLS port)")
ACCEPTED = "CAPABILITY, NOOP, ID, LOGIN, AUTHENTICATE PLAIN and LOGOUT"

_LITERAL = re.compile(rb"\{(\d{1,10})(\+?)\}$")
# RFC 3501: an astring's unquoted form is 1*ASTRING-CHAR, any CHAR but atom-specials except
# "]" (resp-specials may appear); a tag is the same without "+". CHAR is 7-bit, but 8-bit
# bytes are kept in arguments (a UTF-8 user name); a tag must be plain ASCII to be echoed.
_ASTRING_SPECIALS = frozenset(b'(){ %*"\\') | frozenset(range(0x20)) | {0x7F}
_TAG_SPECIALS = _ASTRING_SPECIALS | {ord("+")} | frozenset(range(0x80, 0x100))
_MAX_LITERALS = 4
# RFC 2971: up to 30 field-value pairs, fields of up to 30 octets, values of up to 1,024; as
# quoted strings about 32 KB. An ID command line may be that long, any other one max_line.
ID_MAX_LINE = 34 * 1024
_ID_COMMAND = re.compile(rb"[^ ]+ ID[ (]", re.IGNORECASE)
_WORD = re.compile(rb"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class _Literal:
    data: bytes


_Token = bytes | str  # bytes: an atom; str: a quoted string or literal (decoded UTF-8)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tokenize(parts: list[bytes | _Literal]) -> list[_Token | None]:
    """Split an assembled command into atoms and strings; None stands for a parenthesis."""
    tokens: list[_Token | None] = []
    for part in parts:
        if isinstance(part, _Literal):
            tokens.append(_utf8(part.data))
            continue
        i, n = 0, len(part)
        while i < n:
            c = part[i]
            if c == 0x20:
                i += 1
            elif c in b"()":
                tokens.append(None)
                i += 1
            elif c == 0x22:  # quoted string
                out = bytearray()
                i += 1
                while True:
                    if i >= n:
                        raise ClientError("BAD Unterminated quoted string")
                    c = part[i]
                    if c == 0x5C:
                        if i + 1 >= n or part[i + 1] not in b'"\\':
                            raise ClientError('BAD Only \\" and \\\\ may be escaped in a string')
                        out.append(part[i + 1])
                        i += 2
                    elif c == 0x22:
                        i += 1
                        break
                    elif c == 0:
                        raise ClientError("BAD A quoted string cannot hold a NUL byte")
                    else:
                        out.append(c)
                        i += 1
                tokens.append(_utf8(bytes(out)))
            else:
                start = i
                while i < n and part[i] not in _ASTRING_SPECIALS:
                    i += 1
                if i == start:
                    raise ClientError(f"BAD Unexpected character {printable(bytes([c]))} "
                                      "in command")
                tokens.append(part[start:i])
    return tokens


def printable(data: bytes, limit: int = 40) -> str:
    """Client bytes for a reply: a plain word as it is, anything else quoted with only
    printable ASCII (other bytes as \\xNN), and shortened."""
    if _WORD.fullmatch(data[:limit]):
        return data[:limit].decode() + ("..." if len(data) > limit else "")
    text = "".join(chr(c) if 0x20 <= c < 0x7F and c not in b'"\\' else f"\\x{c:02x}"
                   for c in data[:limit])
    return f'"{text}{"..." if len(data) > limit else ""}"'


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ClientError("BAD Strings must be UTF-8") from None


class ImapLocal(LocalDialogue):
    """Pre-login IMAP server dialogue. One instance per client connection."""

    ERROR = "BAD"
    CANCELLED = "BAD AUTHENTICATE cancelled"
    AUTHZID_REFUSED = "NO [AUTHORIZATIONFAILED] Acting as another user (authzid) is not supported"
    IDLE_BYE = "* BYE Autologout: idle for too long before login\r\n"
    INVALID_BYE = "* BYE Too many invalid commands\r\n"
    FAILURES_BYE = "* BYE Too many failed logins\r\n"

    def __init__(self, *, max_line: int = 8192, max_literal: int = 8192,
                 max_auth_failures: int = 5, tls: TlsOffer | None = None) -> None:
        super().__init__(max_auth_failures=max_auth_failures, tls=tls)
        self.max_line = max_line
        self.max_literal = max_literal
        self._parts: list[bytes | _Literal] = []
        self._literal_left = 0
        self._tag = ""

    def greeting(self) -> bytes:
        return f"* OK [CAPABILITY {self.capabilities()}] mailproxy ready\r\n".encode()

    def capabilities(self) -> str:
        """What this connection offers now (RFC 3501 6.2.1: LOGINDISABLED and no AUTH= while
        passwords wait for TLS)."""
        if not self.tls.available:
            return CAPABILITIES
        words = ["IMAP4rev1"]
        if self.tls.can_start:
            words.append("STARTTLS")
        words += ["AUTH=PLAIN", "SASL-IR"] if self.tls.passwords_allowed else ["LOGINDISABLED"]
        return " ".join([*words, "ID", "LITERAL+"])

    # -- input -----------------------------------------------------------------------------

    def _process(self) -> list[Event]:
        events: list[Event] = []
        while self.state in (State.COMMAND, State.LITERAL, State.SASL):
            if self.state is State.LITERAL:
                if len(self._buf) < self._literal_left:
                    break
                self._parts.append(_Literal(bytes(self._buf[: self._literal_left])))
                del self._buf[: self._literal_left]
                self.state = State.COMMAND
                continue
            end = self._buf.find(b"\n")
            limit = self._line_limit()
            if end < 0:
                if len(self._buf) > limit:
                    events += self._close("* BYE Command line too long\r\n", "line too long")
                break
            if end > limit:
                events += self._close("* BYE Command line too long\r\n", "line too long")
                break
            events += self._line(end)
        return events

    def _line_limit(self) -> int:
        if self.state is State.COMMAND and not self._parts and _ID_COMMAND.match(self._buf):
            return max(self.max_line, ID_MAX_LINE)
        return self.max_line

    def _command(self, line: bytes) -> list[Event]:
        if not self._parts:  # a new command: know its tag early, for errors mid-literal
            self._tag = self._peek_tag(line)
        match = _LITERAL.search(line)
        if match is None:
            self._parts.append(line)
            parts, self._parts = self._parts, []
            return self._dispatch(parts)
        size, non_sync = int(match.group(1)), bool(match.group(2))
        self._parts.append(line[: match.start()])
        too_many = sum(isinstance(p, _Literal) for p in self._parts) >= _MAX_LITERALS
        if size > self.max_literal or too_many:
            self._parts = []
            what = "Too many literals" if too_many else \
                f"Literal of {size} octets is larger than {self.max_literal} before login"
            # A client sends a {n+} literal without waiting, so the stream cannot be resynced.
            raise ClientError(f"BAD {what}", fatal=non_sync)
        self.state = State.LITERAL
        self._literal_left = size
        return [] if non_sync else [Send(b"+ Ready for literal data\r\n")]

    @staticmethod
    def _peek_tag(first: bytes) -> str:
        tag = first.split(b" ", 1)[0]
        valid = tag and all(c not in _TAG_SPECIALS for c in tag)
        return tag.decode("ascii") if valid else ""

    # -- commands --------------------------------------------------------------------------

    def _dispatch(self, parts: list[bytes | _Literal]) -> list[Event]:
        first = parts[0]
        # The tag ends at a space: "a{3}" is no tag "a" followed by a literal.
        whole = isinstance(first, bytes) and (b" " in first or len(parts) == 1)
        self._tag = self._peek_tag(first) if whole and isinstance(first, bytes) else ""
        if not self._tag:
            if parts == [b""]:
                raise ClientError("BAD Empty command line")
            raise ClientError("BAD Missing or invalid command tag")
        tokens = _tokenize(parts)[1:]
        if not tokens or not isinstance(tokens[0], bytes):
            raise ClientError("BAD Missing command")
        command = tokens[0].decode("ascii", "replace").upper()
        if not tokens[0].isascii() or not tokens[0].isalnum():
            command = printable(tokens[0])
        args = tokens[1:]
        tag = self._tag
        if command == "CAPABILITY":
            return [Send(f"* CAPABILITY {self.capabilities()}\r\n{tag} OK CAPABILITY "
                         "completed\r\n".encode())]
        if command == "NOOP":
            return [Send(f"{tag} OK NOOP completed\r\n".encode())]
        if command == "ID":
            ident = f'("name" "mailproxy" "version" {_quote(__version__)})'
            return [Send(f"* ID {ident}\r\n{tag} OK ID completed\r\n".encode())]
        if command == "LOGOUT":
            return self._close(f"* BYE mailproxy logging out\r\n{tag} OK LOGOUT completed\r\n",
                               "logout")
        if command in ("LOGIN", "AUTHENTICATE") and not self.tls.passwords_allowed:
            return [Send(f"{tag} {PRIVACY_REQUIRED}\r\n".encode())]
        if command == "LOGIN":
            if len(args) != 2 or any(a is None for a in args):
                raise ClientError("BAD LOGIN expects a user name and a password")
            user, password = (_utf8(a) if isinstance(a, bytes) else a
                              for a in args if a is not None)
            return self._login(user, password, "LOGIN")
        if command == "AUTHENTICATE":
            return self._authenticate(args)
        if command == "STARTTLS" and self.tls.active:
            raise ClientError("BAD TLS is already active")
        if command == "STARTTLS" and self.tls.available:
            if args:
                raise ClientError("BAD STARTTLS takes no arguments")
            return self._begin_tls(f"{tag} OK Begin TLS negotiation now\r\n")
        if command == "STARTTLS":
            return [Send(f"{tag} NO STARTTLS is not available: this listener has no TLS "
                         "configured; connect without TLS (it listens on this machine only)\r\n"
                         .encode())]
        raise ClientError(f"BAD {command} is not accepted before login; log in first "
                          f"(accepted now: {ACCEPTED})")

    def _authenticate(self, args: list[_Token | None]) -> list[Event]:
        if not args or not isinstance(args[0], bytes):
            raise ClientError("BAD AUTHENTICATE expects a mechanism name")
        mechanism = args[0].decode("ascii", "replace").upper()
        if mechanism != "PLAIN":
            return [Send(f"{self._tag} NO Unsupported mechanism {printable(args[0].upper())}: "
                         "only AUTHENTICATE PLAIN is accepted here\r\n".encode())]
        if len(args) > 2:
            raise ClientError("BAD AUTHENTICATE PLAIN takes at most one initial response")
        if len(args) == 2:
            response = args[1]
            if response is None:
                raise ClientError("BAD Invalid initial response")
            raw = response if isinstance(response, bytes) else response.encode()
            return self._plain(raw)
        self.state = State.SASL
        return [Send(b"+ \r\n")]

    # -- replies ---------------------------------------------------------------------------

    def _reply_line(self, reply: str) -> bytes:
        return f"{self._tag} {reply}\r\n".encode()

    def _welcome(self, capabilities: str | None) -> bytes:
        code = f"[CAPABILITY {capabilities}] " if capabilities else ""
        return f"{self._tag} OK {code}Logged in\r\n".encode()

    # -- errors ----------------------------------------------------------------------------

    def _error(self, exc: ClientError) -> list[Event]:
        self.state = State.COMMAND
        self._parts = []
        tag = self._tag or "*"
        events: list[Event] = [Send(f"{tag} {exc.reply}\r\n".encode())]
        if exc.fatal:
            events += self._close("* BYE Cannot continue after that error\r\n", exc.reply)
        return events
