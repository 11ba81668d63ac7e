"""The proxy's upstream POP3 login, driven without sockets."""

from __future__ import annotations

import base64
import json

import pytest

from proxy.core.events import (
    Event,
    LoggedIn,
    ReadyToAuthenticate,
    Rejected,
    Send,
    StartTls,
    UpstreamFailed,
)
from proxy.core.pop3_upstream import Pop3Upstream, State
from proxy.core.sasl import initial_response

XOAUTH2_IR = initial_response("XOAUTH2", "u@example.com", "tok")
GMAIL_CAPA = (b"+OK Capability list follows\r\nUSER\r\nRESP-CODES\r\nEXPIRE 0\r\n"
              b"LOGIN-DELAY 300\r\nTOP\r\nUIDL\r\nX-GOOGLE-RICO\r\n"
              b"SASL PLAIN XOAUTH2 OAUTHBEARER\r\n.\r\n")


def feed(core: Pop3Upstream, data: bytes, trickle: bool = False) -> list[Event]:
    if not trickle:
        return core.receive(data)
    events: list[Event] = []
    for i in range(len(data)):
        events += core.receive(data[i : i + 1])
    return events


def sent(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def ready(capa: bytes = GMAIL_CAPA, **kwargs: str) -> Pop3Upstream:
    core = Pop3Upstream("u@example.com", **kwargs)  # type: ignore[arg-type]
    assert sent(core.receive(b"+OK Gpop ready\r\n")) == b"CAPA\r\n"
    assert core.receive(capa) == [ReadyToAuthenticate()]
    return core


@pytest.mark.parametrize("trickle", [False, True])
def test_two_step_xoauth2_login(trickle: bool) -> None:
    core = Pop3Upstream("u@example.com")
    assert sent(feed(core, b"+OK Gpop ready for requests from 1.2.3.4\r\n", trickle)) == \
        b"CAPA\r\n"
    assert feed(core, GMAIL_CAPA, trickle) == [ReadyToAuthenticate()]
    assert core.sasl == frozenset({"PLAIN", "XOAUTH2", "OAUTHBEARER"})
    assert {"USER", "TOP", "UIDL", "SASL"} <= core.capabilities
    # Never the one-line form: Microsoft refuses it and 3 KB tokens break the 255-octet limit.
    assert sent(core.authenticate("tok")) == b"AUTH XOAUTH2\r\n"
    assert sent(feed(core, b"+ \r\n", trickle)) == XOAUTH2_IR + b"\r\n"
    rest = b"+OK Welcome.\r\n+OK 2 320\r\n"
    step = 1 if trickle else len(rest)
    events: list[Event] = []
    while not events:  # the shell stops feeding at the verdict; the rest stays on the socket
        events, rest = core.receive(rest[:step]), rest[step:]
    [event] = events
    assert isinstance(event, LoggedIn) and event.capabilities is None
    assert event.trailing + rest == b"+OK 2 320\r\n"
    assert core.state is State.DONE
    with pytest.raises(RuntimeError):
        core.receive(b"x")


def test_bare_plus_continuation() -> None:  # some servers send "+" without the space
    core = ready()
    core.authenticate("tok")
    assert sent(core.receive(b"+\r\n")) == XOAUTH2_IR + b"\r\n"


@pytest.mark.parametrize("mechanism, ack", [("xoauth2", b"\r\n"), ("oauthbearer", b"AQ==\r\n")])
def test_failure_challenge_is_answered_then_rejected(mechanism: str, ack: bytes) -> None:
    core = ready(mechanism=mechanism)
    assert sent(core.authenticate("tok")) == f"AUTH {mechanism.upper()}\r\n".encode()
    core.receive(b"+ \r\n")
    challenge = base64.b64encode(json.dumps(
        {"status": "401", "schemes": "bearer", "scope": "mail"}).encode())
    assert sent(core.receive(b"+ " + challenge + b"\r\n")) == ack
    events = core.receive(b"-ERR [AUTH] Authentication failed.\r\n")
    assert events == [Rejected("[AUTH] Authentication failed.", False,
                               {"status": "401", "schemes": "bearer", "scope": "mail"})]
    # The same connection can try again with another token.
    assert core.state is State.READY
    assert sent(core.authenticate("tok2")) == f"AUTH {mechanism.upper()}\r\n".encode()


def test_oauthbearer_only_when_xoauth2_missing() -> None:
    core = ready(b"+OK\r\nSASL OAUTHBEARER PLAIN\r\nUSER\r\n.\r\n")
    assert sent(core.authenticate("t")) == b"AUTH OAUTHBEARER\r\n"
    bearer = base64.b64decode(sent(core.receive(b"+ \r\n")))
    assert bearer.startswith(b"n,a=u@example.com,\x01") and b"auth=Bearer t\x01\x01" in bearer


@pytest.mark.parametrize("code", [b"SYS/TEMP", b"IN-USE", b"LOGIN-DELAY", b"sys/temp"])
def test_temporary_codes(code: bytes) -> None:
    core = ready()
    core.authenticate("t")
    core.receive(b"+ \r\n")
    [event] = core.receive(b"-ERR [" + code + b"] try later\r\n")
    assert isinstance(event, Rejected) and event.temporary


def test_temporary_refusal_of_the_auth_command_itself() -> None:
    core = ready()
    core.authenticate("t")
    [event] = core.receive(b"-ERR [SYS/TEMP] Auth process not responding\r\n")
    assert isinstance(event, Rejected) and event.temporary


def test_auth_command_refused_means_mechanism_missing() -> None:
    core = ready(b"+OK\r\nUSER\r\n.\r\n")  # no SASL line: try XOAUTH2 anyway
    assert core.sasl is None
    assert sent(core.authenticate("t")) == b"AUTH XOAUTH2\r\n"
    [event] = core.receive(b"-ERR Unsupported authentication mechanism.\r\n")
    assert event == UpstreamFailed(
        "server refused AUTH XOAUTH2: Unsupported authentication mechanism.")


def test_no_capa_support_still_tries_xoauth2() -> None:
    core = Pop3Upstream("u@example.com")
    core.receive(b"+OK hi\r\n")
    assert core.receive(b"-ERR unknown command\r\n") == [ReadyToAuthenticate()]
    assert sent(core.authenticate("t")) == b"AUTH XOAUTH2\r\n"


def test_sasl_without_oauth_fails_with_reason() -> None:
    core = ready(b"+OK\r\nSASL PLAIN LOGIN\r\n.\r\n")
    [event] = core.authenticate("t")
    assert event == UpstreamFailed(
        "server does not offer SASL XOAUTH2 or OAUTHBEARER (it offers: LOGIN PLAIN)")


def test_stls_then_capa_after_tls() -> None:
    core = Pop3Upstream("u@example.com", starttls=True)
    assert sent(core.receive(b"+OK Dovecot ready.\r\n")) == b"STLS\r\n"
    assert core.receive(b"+OK Begin TLS negotiation now.\r\n") == [StartTls()]
    assert sent(core.tls_established()) == b"CAPA\r\n"
    assert core.receive(b"+OK\r\nSASL XOAUTH2\r\n..odd\r\n.\r\n") == [ReadyToAuthenticate()]
    assert ".ODD" in core.capabilities  # dot-stuffing undone


def test_data_injected_after_stls_ok_is_refused() -> None:
    core = Pop3Upstream("u@example.com", starttls=True)
    core.receive(b"+OK hi\r\n")
    [event] = core.receive(b"+OK Begin TLS\r\n+OK\r\n")
    assert isinstance(event, UpstreamFailed) and "after accepting STLS" in event.reason


def test_stls_refused() -> None:
    core = Pop3Upstream("u@example.com", starttls=True)
    core.receive(b"+OK hi\r\n")
    assert core.receive(b"-ERR TLS not configured\r\n") == [
        UpstreamFailed("STLS refused: TLS not configured")]


@pytest.mark.parametrize("greeting, reason", [
    (b"-ERR [SYS/TEMP] too many connections\r\n",
     "server refused the connection: [SYS/TEMP] too many connections"),
    (b"* OK IMAP4rev1 ready\r\n", "not a POP3 greeting: '* OK IMAP4rev1 ready'"),
])
def test_bad_greetings(greeting: bytes, reason: str) -> None:
    assert Pop3Upstream("u").receive(greeting) == [UpstreamFailed(reason)]


def test_garbage_during_auth_and_overlong_lines() -> None:
    core = ready()
    core.authenticate("t")
    core.receive(b"+ \r\n")
    [event] = core.receive(b"hello\r\n")
    assert isinstance(event, UpstreamFailed) and "not a POP3 response" in event.reason
    core = Pop3Upstream("u")
    [event] = core.receive(b"+" * 70000)
    assert event == UpstreamFailed("server sent an over-long line")


def test_api_misuse_is_a_bug() -> None:
    core = Pop3Upstream("u")
    with pytest.raises(RuntimeError):
        core.authenticate("t")
    with pytest.raises(RuntimeError):
        core.tls_established()
