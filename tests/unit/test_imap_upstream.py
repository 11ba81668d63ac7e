"""The proxy's upstream IMAP login, driven without sockets."""

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
from proxy.core.imap_upstream import ImapUpstream, State
from proxy.core.sasl import initial_response

XOAUTH2_IR = initial_response("XOAUTH2", "u@example.com", "tok")


def feed(core: ImapUpstream, data: bytes, trickle: bool = False) -> list[Event]:
    if not trickle:
        return core.receive(data)
    events: list[Event] = []
    for i in range(len(data)):
        events += core.receive(data[i : i + 1])
    return events


def sent(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def test_xoauth2_string_matches_the_protocol_notes() -> None:
    assert base64.b64decode(XOAUTH2_IR) == b"user=u@example.com\x01auth=Bearer tok\x01\x01"
    bearer = base64.b64decode(initial_response("OAUTHBEARER", "a,b=c@x", "tok", "h", 993))
    assert bearer == b"n,a=a=2Cb=3Dc@x,\x01host=h\x01port=993\x01auth=Bearer tok\x01\x01"


@pytest.mark.parametrize("trickle", [False, True])
def test_sasl_ir_login_with_caps_in_greeting(trickle: bool) -> None:
    core = ImapUpstream("u@example.com")
    events = feed(core, b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n", trickle)
    assert events == [ReadyToAuthenticate()]
    assert sent(core.authenticate("tok")) == b"mp1 AUTHENTICATE XOAUTH2 " + XOAUTH2_IR + b"\r\n"
    rest = b"* CAPABILITY IMAP4rev1 IDLE MOVE\r\nmp1 OK Logged in\r\n* 3 EXISTS\r\n"
    step = 1 if trickle else len(rest)
    events: list[Event] = []
    while not events:  # the shell stops feeding at the verdict; the rest stays on the socket
        events, rest = core.receive(rest[:step]), rest[step:]
    assert events == [LoggedIn("IMAP4rev1 IDLE MOVE", events[0].trailing)]  # type: ignore[union-attr]
    assert events[0].trailing + rest == b"* 3 EXISTS\r\n"  # type: ignore[union-attr]
    with pytest.raises(RuntimeError):
        core.receive(b"x")


def test_caps_in_tagged_ok_and_capability_command_when_greeting_has_none() -> None:
    core = ImapUpstream("u@example.com")
    assert sent(core.receive(b"* OK ready\r\n")) == b"mp1 CAPABILITY\r\n"
    events = core.receive(b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\nmp1 OK done\r\n")
    assert events == [ReadyToAuthenticate()]
    # No SASL-IR: wait for the continuation before sending the token.
    assert sent(core.authenticate("tok")) == b"mp2 AUTHENTICATE XOAUTH2\r\n"
    assert sent(core.receive(b"+ \r\n")) == XOAUTH2_IR + b"\r\n"
    events = core.receive(b"mp2 OK [CAPABILITY IMAP4rev1 X-GM-EXT-1] Success\r\n")
    assert events == [LoggedIn("IMAP4rev1 X-GM-EXT-1", b"")]


@pytest.mark.parametrize("mechanism, ack", [("XOAUTH2", b"\r\n"), ("OAUTHBEARER", b"AQ==\r\n")])
def test_failure_challenge_is_answered_then_rejected(mechanism: str, ack: bytes) -> None:
    core = ImapUpstream("u@example.com")
    core.receive(f"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH={mechanism}] hi\r\n".encode())
    core.authenticate("tok")
    challenge = base64.b64encode(json.dumps(
        {"status": "400", "schemes": "bearer", "scope": "https://mail.google.com/"}).encode())
    assert sent(core.receive(b"+ " + challenge + b"\r\n")) == ack
    events = core.receive(b"mp1 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n")
    assert events == [Rejected("[AUTHENTICATIONFAILED] Invalid credentials (Failure)", False,
                               {"status": "400", "schemes": "bearer",
                                "scope": "https://mail.google.com/"})]
    # The same connection can try again with another token.
    assert core.state is State.READY
    assert sent(core.authenticate("tok2")).startswith(b"mp2 AUTHENTICATE " + mechanism.encode())


def test_oauthbearer_only_when_xoauth2_missing() -> None:
    core = ImapUpstream("u@example.com")
    core.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=OAUTHBEARER AUTH=PLAIN] hi\r\n")
    assert sent(core.authenticate("t")) == b"mp1 AUTHENTICATE OAUTHBEARER\r\n"


def test_unavailable_is_temporary() -> None:
    core = ImapUpstream("u@example.com")
    core.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n")
    core.authenticate("t")
    [event] = core.receive(b"mp1 NO [UNAVAILABLE] Temporary authentication failure\r\n")
    assert isinstance(event, Rejected) and event.temporary


def test_no_oauth_mechanism_fails_with_reason() -> None:
    core = ImapUpstream("u@example.com")
    core.receive(b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=PLAIN] hi\r\n")
    [event] = core.authenticate("t")
    assert event == UpstreamFailed(
        "server does not offer AUTH=XOAUTH2 or AUTH=OAUTHBEARER (it offers: AUTH=PLAIN)")


def test_starttls_discards_pre_tls_capabilities() -> None:
    core = ImapUpstream("u@example.com", starttls=True)
    events = core.receive(b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=XOAUTH2 SASL-IR] hi\r\n")
    assert sent(events) == b"mp1 STARTTLS\r\n"
    assert core.receive(b"mp1 OK Begin TLS\r\n") == [StartTls()]
    assert sent(core.tls_established()) == b"mp2 CAPABILITY\r\n"
    assert core.capabilities == frozenset()
    events = core.receive(b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\nmp2 OK\r\n")
    assert events == [ReadyToAuthenticate()]
    assert "SASL-IR" not in core.capabilities


def test_data_injected_after_starttls_ok_is_refused() -> None:
    core = ImapUpstream("u@example.com", starttls=True)
    core.receive(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n")
    [event] = core.receive(b"mp1 OK Begin TLS\r\n* CAPABILITY AUTH=PLAIN\r\n")
    assert isinstance(event, UpstreamFailed) and "after accepting STARTTLS" in event.reason


@pytest.mark.parametrize("greeting, reason", [
    (b"* BYE too busy\r\n", "server refused the connection: too busy"),
    (b"* PREAUTH hi\r\n", "server says the connection is already authenticated (PREAUTH)"),
    (b"+OK POP3 ready\r\n", "not an IMAP greeting: '+OK POP3 ready'"),
])
def test_bad_greetings(greeting: bytes, reason: str) -> None:
    assert ImapUpstream("u").receive(greeting) == [UpstreamFailed(reason)]
