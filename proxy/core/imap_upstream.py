"""The proxy's own IMAP login to the upstream server, as a sans-IO state machine.

greeting -> [STARTTLS] -> [CAPABILITY] -> ReadyToAuthenticate -> authenticate(token) ->
LoggedIn | Rejected. After a rejection the shell may call ``authenticate`` again with a new
token on the same connection. Nothing after the login is parsed.
"""

from __future__ import annotations

from .events import Event, LoggedIn, ReadyToAuthenticate, Rejected, Send
from .sasl import choose_mechanism, failure_acknowledgement, parse_failure_challenge
from .upstream import CODE, State, UpstreamLogin

__all__ = ["TEMPORARY_CODES", "ImapUpstream", "State"]

# Response codes after which a retry with a new token is pointless: the server is the problem.
TEMPORARY_CODES = frozenset({"UNAVAILABLE", "SERVERBUG", "LIMIT", "INUSE"})


class ImapUpstream(UpstreamLogin):
    def __init__(self, user: str, *, starttls: bool = False, mechanism: str = "auto",
                 host: str | None = None, port: int | None = None) -> None:
        super().__init__(user, starttls=starttls, mechanism=mechanism, host=host, port=port)
        self._post_login_caps: str | None = None
        self._seq = 0
        self._tag = ""

    def tls_established(self) -> list[Event]:
        """The shell finished the TLS handshake; capabilities seen before it are void."""
        if self.state is not State.TLS:
            raise RuntimeError("tls_established() without a StartTls")
        self.capabilities = frozenset()
        return self._ask_capability()

    def authenticate(self, token: str) -> list[Event]:
        if self.state is not State.READY:
            raise RuntimeError(f"authenticate() in state {self.state.name}")
        mechanism = choose_mechanism(self.capabilities, self.preference)
        if mechanism is None:
            offered = " ".join(sorted(c for c in self.capabilities if c.startswith("AUTH="))) \
                or "none"
            wanted = "AUTH=XOAUTH2 or AUTH=OAUTHBEARER" if self.preference == "auto" \
                else f"AUTH={self.preference.upper()}"
            return [self._fail(f"server does not offer {wanted} (it offers: {offered})",
                               "mechanism")]
        self._mechanism, self._token = mechanism, token
        self._challenge = {}
        tag = self._next_tag()
        if "SASL-IR" in self.capabilities:
            self.state = State.AUTH_SENT
            line = f"{tag} AUTHENTICATE {mechanism} ".encode() + self._response() + b"\r\n"
        else:
            self.state = State.AUTH
            line = f"{tag} AUTHENTICATE {mechanism}\r\n".encode()
        return [Send(line), *self.receive(b"")]

    # -- responses -------------------------------------------------------------------------

    def _line(self, line: str) -> list[Event]:
        if self.state is State.GREETING:
            return self._greeting(line)
        if line.startswith("+"):
            return self._continuation(line[1:].strip())
        if line.startswith("* "):
            return self._untagged(line[2:])
        tag, _, rest = line.partition(" ")
        if tag != self._tag:
            return [self._fail(f"unexpected response {line[:80]!r}")]
        status, _, text = rest.partition(" ")
        return self._tagged(status.upper(), text)

    def _greeting(self, line: str) -> list[Event]:
        kind, _, text = line.partition(" ")[2].partition(" ")
        kind = kind.upper()
        if not line.startswith("* ") or kind not in ("OK", "PREAUTH", "BYE"):
            return [self._fail(f"not an IMAP greeting: {line[:80]!r}")]
        if kind == "BYE":
            return [self._fail(f"server refused the connection: {text}")]
        if kind == "PREAUTH":
            return [self._fail("server says the connection is already authenticated (PREAUTH)")]
        self._read_code(text)
        if self.starttls:
            if self.capabilities and "STARTTLS" not in self.capabilities:
                return [self._fail("server does not offer STARTTLS", "starttls")]
            self.state = State.STARTTLS
            return [Send(f"{self._next_tag()} STARTTLS\r\n".encode())]
        if any(c.startswith("AUTH=") for c in self.capabilities):
            self.state = State.READY
            return [ReadyToAuthenticate()]
        return self._ask_capability()

    def _ask_capability(self) -> list[Event]:
        self.state = State.CAPABILITY
        return [Send(f"{self._next_tag()} CAPABILITY\r\n".encode())]

    def _untagged(self, text: str) -> list[Event]:
        word, _, rest = text.partition(" ")
        word = word.upper()
        if word == "CAPABILITY":
            self._set_caps(rest)
        elif word == "BYE":
            return [self._fail(f"server closed the session: {rest}")]
        elif word in ("OK", "NO", "BAD"):
            self._read_code(rest)
        return []

    def _continuation(self, data: str) -> list[Event]:
        if self.state is State.AUTH:
            self.state = State.AUTH_SENT
            return [Send(self._response() + b"\r\n")]
        if self.state is State.AUTH_SENT:
            # A failure challenge: answer it, or the server waits for ever.
            self._challenge = parse_failure_challenge(data.encode())
            return [Send(failure_acknowledgement(self._mechanism) + b"\r\n")]
        return [self._fail(f"unexpected continuation in state {self.state.name}")]

    def _tagged(self, status: str, text: str) -> list[Event]:
        code = self._read_code(text)
        text = CODE.sub("", text)
        if self.state is State.STARTTLS:
            if status != "OK":
                return [self._fail(f"STARTTLS refused: {text}", "starttls")]
            return self._start_tls("STARTTLS")
        if self.state is State.CAPABILITY:
            if status != "OK":
                return [self._fail(f"CAPABILITY failed: {text}")]
            self.state = State.READY
            return [ReadyToAuthenticate()]
        if self.state in (State.AUTH, State.AUTH_SENT):
            self._token = ""
            if status == "OK":
                return [LoggedIn(self._post_login_caps, self._logged_in())]
            self.state = State.READY
            shown = f"[{code}] {text}" if code else text
            temporary = code is not None and code.split()[0].upper() in TEMPORARY_CODES
            return [Rejected(shown.strip(), temporary, dict(self._challenge))]
        return [self._fail(f"unexpected tagged response in state {self.state.name}")]

    # -- helpers ---------------------------------------------------------------------------

    def _read_code(self, text: str) -> str | None:
        match = CODE.match(text)
        if not match:
            return None
        code = match.group(1)
        if code.upper().startswith("CAPABILITY "):
            self._set_caps(code[len("CAPABILITY "):])
        return code

    def _set_caps(self, caps: str) -> None:
        if self.state in (State.AUTH, State.AUTH_SENT):
            self._post_login_caps = caps.strip()  # what the client should see after login
        else:
            self.capabilities = frozenset(caps.upper().split())

    def _next_tag(self) -> str:
        self._seq += 1
        self._tag = f"mp{self._seq}"
        return self._tag
