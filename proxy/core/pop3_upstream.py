"""The proxy's own POP3 login to the upstream server, as a sans-IO state machine.

greeting -> [STLS] -> CAPA -> ReadyToAuthenticate -> authenticate(token) -> LoggedIn | Rejected.
The token always goes on its own line after ``AUTH <mechanism>`` and the server's ``+``: POP3
lines are limited to 255 octets and Microsoft refuses the one-line form. After a rejection the
shell may call ``authenticate`` again with a new token on the same connection.
"""

from __future__ import annotations

from .events import Event, LoggedIn, ReadyToAuthenticate, Rejected, Send
from .sasl import Mechanism, choose_mechanism, failure_acknowledgement, parse_failure_challenge
from .upstream import CODE, State, UpstreamLogin

__all__ = ["TEMPORARY_CODES", "Pop3Upstream", "State"]

# RFC 2449 / RFC 3206 response codes after which a new token would not help.
TEMPORARY_CODES = frozenset({"SYS/TEMP", "IN-USE", "LOGIN-DELAY"})


def _status(line: str) -> tuple[str, str]:
    """("+OK" | "-ERR" | "", the text after it)."""
    word, _, text = line.partition(" ")
    word = word.upper()
    return (word, text) if word in ("+OK", "-ERR") else ("", line)


class Pop3Upstream(UpstreamLogin):
    """``capabilities`` holds the CAPA tags (upper case); STARTTLS and CAPABILITY in ``State``
    stand for STLS and CAPA."""

    def __init__(self, user: str, *, starttls: bool = False, mechanism: str = "auto",
                 host: str | None = None, port: int | None = None) -> None:
        super().__init__(user, starttls=starttls, mechanism=mechanism, host=host, port=port)
        self.sasl: frozenset[str] | None = None  # the SASL line's mechanisms; None: no such line
        self._capa: list[str] | None = None  # lines of a CAPA answer being read

    def tls_established(self) -> list[Event]:
        """The shell finished the TLS handshake: ask for the capabilities (first time)."""
        if self.state is not State.TLS:
            raise RuntimeError("tls_established() without a StartTls")
        return self._ask_capa()

    def authenticate(self, token: str) -> list[Event]:
        if self.state is not State.READY:
            raise RuntimeError(f"authenticate() in state {self.state.name}")
        if self.sasl is None:
            # No SASL line (no CAPA, or a server that lists it only sometimes): try anyway; a
            # server without the mechanism answers -ERR to the AUTH command.
            mechanism: Mechanism | None = \
                "OAUTHBEARER" if self.preference == "oauthbearer" else "XOAUTH2"
        else:
            mechanism = choose_mechanism(frozenset(f"AUTH={m}" for m in self.sasl),
                                         self.preference)
        if mechanism is None:
            offered = " ".join(sorted(self.sasl or ())) or "nothing"
            wanted = "XOAUTH2 or OAUTHBEARER" if self.preference == "auto" \
                else self.preference.upper()
            return [self._fail(f"server does not offer SASL {wanted} (it offers: {offered})",
                               "mechanism")]
        self._mechanism, self._token = mechanism, token
        self._challenge = {}
        self.state = State.AUTH
        return [Send(f"AUTH {mechanism}\r\n".encode()), *self.receive(b"")]

    # -- responses -------------------------------------------------------------------------

    def _line(self, line: str) -> list[Event]:
        state = self.state
        if state is State.CAPABILITY and self._capa is not None:
            return self._capa_line(line)
        if state in (State.AUTH, State.AUTH_SENT) and (line == "+" or line.startswith("+ ")):
            return self._continuation(line[2:])
        status, text = _status(line)
        if not status:
            what = "greeting" if state is State.GREETING else "response"
            return [self._fail(f"not a POP3 {what}: {line[:80]!r}")]
        if state is State.GREETING:
            if status == "-ERR":
                return [self._fail(f"server refused the connection: {text}")]
            if self.starttls:
                self.state = State.STARTTLS
                return [Send(b"STLS\r\n")]
            return self._ask_capa()
        if state is State.STARTTLS:
            if status != "+OK":
                return [self._fail(f"STLS refused: {text}", "starttls")]
            return self._start_tls("STLS")
        if state is State.CAPABILITY:
            if status == "+OK":
                self._capa = []
                return []
            self.state = State.READY  # no CAPA (RFC 1939 server): go ahead without it
            return [ReadyToAuthenticate()]
        return self._verdict(status, text)

    def _ask_capa(self) -> list[Event]:
        self.state = State.CAPABILITY
        self.capabilities, self.sasl, self._capa = frozenset(), None, None
        return [Send(b"CAPA\r\n")]

    def _capa_line(self, line: str) -> list[Event]:
        assert self._capa is not None
        if line != ".":
            self._capa.append(line[1:] if line.startswith(".") else line)  # dot-stuffing
            return []
        tags: set[str] = set()
        for entry in self._capa:
            tag, _, args = entry.partition(" ")
            tags.add(tag.upper())
            if tag.upper() == "SASL":
                self.sasl = frozenset(args.upper().split())
        self.capabilities = frozenset(tags)
        self._capa = None
        self.state = State.READY
        return [ReadyToAuthenticate()]

    def _continuation(self, data: str) -> list[Event]:
        if self.state is State.AUTH:
            self.state = State.AUTH_SENT
            return [Send(self._response() + b"\r\n")]
        # A failure challenge: answer it, or the server waits for ever.
        self._challenge = parse_failure_challenge(data.encode())
        return [Send(failure_acknowledgement(self._mechanism) + b"\r\n")]

    def _verdict(self, status: str, text: str) -> list[Event]:
        if self.state not in (State.AUTH, State.AUTH_SENT):
            return [self._fail(f"unexpected {status} in state {self.state.name}")]
        before_token = self.state is State.AUTH
        self._token = ""
        if status == "+OK":
            if before_token:
                return [self._fail(f"server accepted AUTH {self._mechanism} without a token")]
            return [LoggedIn(None, self._logged_in())]
        match = CODE.match(text)
        code = match.group(1).upper() if match else None
        temporary = code in TEMPORARY_CODES
        if before_token and not temporary:
            # The AUTH command itself was refused: the mechanism is missing or switched off.
            return [self._fail(f"server refused AUTH {self._mechanism}: {text}", "mechanism")]
        self.state = State.READY
        return [Rejected(text.strip(), temporary, dict(self._challenge))]
