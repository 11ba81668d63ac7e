"""STARTTLS/STLS in the local cores: what is offered, passwords refused before TLS where it is
required, and bytes pipelined after the command dropped (the injection defence)."""

from __future__ import annotations

import pytest

from proxy.core.events import AcceptTls, Event, LoginRequest, Send
from proxy.core.imap import ImapLocal
from proxy.core.pop3 import Pop3Local
from proxy.core.tlsoffer import TlsOffer


def sent(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def trickle(core: ImapLocal | Pop3Local, data: bytes) -> list[Event]:
    events: list[Event] = []
    for i in range(len(data)):
        events += core.receive(data[i:i + 1])
    return events


# -- IMAP -------------------------------------------------------------------------------------


def test_imap_offers_starttls_on_a_plain_listener() -> None:
    core = ImapLocal(tls=TlsOffer(available=True))
    assert b"[CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN SASL-IR ID LITERAL+]" in core.greeting()
    events = trickle(core, b"a STARTTLS\r\n")
    assert events == [AcceptTls(b"a OK Begin TLS negotiation now\r\n", 0)]
    with pytest.raises(RuntimeError):
        core.receive(b"x")  # the shell feeds nothing during the handshake
    assert core.tls_established() == []
    assert sent(core.receive(b"b CAPABILITY\r\n")) == (
        b"* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR ID LITERAL+\r\nb OK CAPABILITY completed\r\n")
    assert sent(core.receive(b"c STARTTLS\r\n")) == b"c BAD TLS is already active\r\n"
    assert core.receive(b"d LOGIN u p\r\n") == [LoginRequest("u", "p", "LOGIN")]


def test_imap_login_pipelined_after_starttls_is_dropped() -> None:
    core = ImapLocal(tls=TlsOffer(available=True))
    injected = b"b LOGIN user password\r\nc SELECT INBOX\r\n"
    events = core.receive(b"a STARTTLS\r\n" + injected)
    assert events == [AcceptTls(b"a OK Begin TLS negotiation now\r\n", len(injected))]
    assert core.tls_established() == []  # nothing left over to run
    assert sent(core.receive(b"d NOOP\r\n")) == b"d OK NOOP completed\r\n"


def test_imap_require_tls() -> None:
    core = ImapLocal(tls=TlsOffer(available=True, required=True))
    assert b"[CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED ID LITERAL+]" in core.greeting()
    for command in (b"a LOGIN u p\r\n", b"a AUTHENTICATE PLAIN\r\n",
                    b"a AUTHENTICATE PLAIN AHUAcA==\r\n"):
        events = trickle(core, command)
        assert sent(events) == (b"a NO [PRIVACYREQUIRED] Passwords are not accepted in the "
                                b"clear here: use STARTTLS first (or the implicit-TLS port)\r\n")
        assert not any(isinstance(e, LoginRequest) for e in events)
    core.receive(b"s STARTTLS\r\n")
    core.tls_established()
    assert sent(core.receive(b"c CAPABILITY\r\n")).startswith(
        b"* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR ID LITERAL+\r\n")
    assert core.receive(b"d AUTHENTICATE PLAIN AHUAcA==\r\n") == [
        LoginRequest("u", "p", "PLAIN")]


def test_imap_implicit_tls_listener_and_no_tls() -> None:
    core = ImapLocal(tls=TlsOffer(available=True, required=True, active=True))
    assert b"[CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR ID LITERAL+]" in core.greeting()
    assert sent(core.receive(b"a STARTTLS\r\n")) == b"a BAD TLS is already active\r\n"
    plain = ImapLocal()
    assert sent(plain.receive(b"a STARTTLS\r\n")).startswith(b"a NO STARTTLS is not available")
    assert sent(ImapLocal(tls=TlsOffer(available=True)).receive(b"a STARTTLS x\r\n")) == (
        b"a BAD STARTTLS takes no arguments\r\n")


# -- POP3 -------------------------------------------------------------------------------------


def capa(core: Pop3Local) -> bytes:
    return sent(core.receive(b"CAPA\r\n"))


def test_pop3_offers_stls_and_drops_what_follows() -> None:
    core = Pop3Local(tls=TlsOffer(available=True))
    assert capa(core).startswith(b"+OK Capability list follows\r\nSTLS\r\nUSER\r\n")
    injected = b"USER u\r\nPASS p\r\n"
    events = trickle(core, b"STLS\r\n")
    assert events == [AcceptTls(b"+OK Begin TLS negotiation\r\n", 0)]
    assert core.tls_established() == []
    assert b"STLS" not in capa(core)
    assert sent(core.receive(b"STLS\r\n")) == b"-ERR Command not permitted when TLS active\r\n"
    again = Pop3Local(tls=TlsOffer(available=True))
    assert again.receive(b"STLS\r\n" + injected) == [
        AcceptTls(b"+OK Begin TLS negotiation\r\n", len(injected))]
    assert again.tls_established() == []


def test_pop3_require_tls() -> None:
    core = Pop3Local(tls=TlsOffer(available=True, required=True))
    listing = capa(core)
    assert b"STLS\r\n" in listing and b"USER" not in listing and b"SASL" not in listing
    refusal = (b"-ERR Passwords are not accepted in the clear here: send STLS first (or use "
               b"the implicit-TLS port)\r\n")
    for command in (b"USER u\r\n", b"PASS p\r\n", b"AUTH PLAIN\r\n", b"AUTH\r\n"):
        events = trickle(core, command)
        assert sent(events) == refusal and not any(isinstance(e, LoginRequest) for e in events)
    core.receive(b"STLS\r\n")
    core.tls_established()
    assert b"USER\r\n" in capa(core)
    assert sent(core.receive(b"USER u\r\n")) == b"+OK Send PASS\r\n"
    assert core.receive(b"PASS p\r\n") == [LoginRequest("u", "p", "USER/PASS")]


def test_pop3_without_tls_keeps_its_answer() -> None:
    core = Pop3Local()
    assert b"STLS" not in capa(core)
    assert sent(core.receive(b"STLS\r\n")).startswith(b"-ERR STLS is not available")
