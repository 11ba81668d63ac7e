"""The pre-login POP3 dialogue, driven without sockets; every script also fed a byte at a time."""

from __future__ import annotations

import base64

import pytest

from proxy.core.events import Close, Event, LoginRequest, Send
from proxy.core.pop3 import MAX_LINE, MAX_SASL_LINE, Pop3Local, State


def feed(core: Pop3Local, data: bytes, trickle: bool) -> list[Event]:
    if not trickle:
        return core.receive(data)
    events: list[Event] = []
    for i in range(len(data)):
        if core.state is State.CLOSED:
            break
        events += core.receive(data[i : i + 1])
    return events


def sent(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def logins(events: list[Event]) -> list[LoginRequest]:
    return [e for e in events if isinstance(e, LoginRequest)]


def closes(events: list[Event]) -> list[Close]:
    return [e for e in events if isinstance(e, Close)]


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


both = pytest.mark.parametrize("trickle", [False, True], ids=["whole", "bytewise"])


def test_greeting() -> None:
    assert Pop3Local().greeting() == b"+OK mailproxy ready\r\n"


@both
def test_capa_lists_user_and_sasl_plain_only(trickle: bool) -> None:
    out = sent(feed(Pop3Local(), b"CAPA\r\ncapa\n", trickle))
    listing = (b"+OK Capability list follows\r\nUSER\r\nSASL PLAIN\r\nRESP-CODES\r\n"
               b"AUTH-RESP-CODE\r\nIMPLEMENTATION mailproxy\r\n.\r\n")
    assert out == listing * 2
    assert b"STLS" not in out and b"PIPELINING" not in out


@both
def test_user_then_pass(trickle: bool) -> None:
    core = Pop3Local()
    events = feed(core, b"USER alice@example.com\r\n", trickle)
    assert sent(events) == b"+OK Send PASS\r\n"
    events = feed(core, b"PASS  s3cret with spaces \r\n", trickle)
    # RFC 1939: the rest of the line is the password, spaces and all.
    assert logins(events) == [LoginRequest("alice@example.com", " s3cret with spaces ",
                                           "USER/PASS")]
    assert core.state is State.LOGIN


@both
def test_commands_are_case_insensitive_and_utf8_passwords(trickle: bool) -> None:
    core = Pop3Local()
    events = feed(core, "user Alice@Example.com\r\npass grüße\r\n".encode(), trickle)
    assert logins(events) == [LoginRequest("Alice@Example.com", "grüße", "USER/PASS")]


@both
def test_pass_without_user(trickle: bool) -> None:
    core = Pop3Local()
    assert sent(feed(core, b"PASS x\r\n", trickle)) == b"-ERR Send USER first\r\n"
    assert core.state is State.COMMAND


@both
def test_auth_plain_with_initial_response(trickle: bool) -> None:
    core = Pop3Local()
    events = feed(core, b"AUTH PLAIN " + plain("alice@example.com", "pw") + b"\r\n", trickle)
    assert logins(events) == [LoginRequest("alice@example.com", "pw", "PLAIN")]


@both
def test_auth_plain_with_continuation(trickle: bool) -> None:
    core = Pop3Local()
    assert sent(feed(core, b"AUTH PLAIN\r\n", trickle)) == b"+ \r\n"
    events = feed(core, plain("alice@example.com", "pw", "alice@example.com") + b"\r\n", trickle)
    assert logins(events) == [LoginRequest("alice@example.com", "pw", "PLAIN")]


@both
def test_auth_cancelled_with_star(trickle: bool) -> None:
    core = Pop3Local()
    events = feed(core, b"AUTH PLAIN\r\n*\r\nCAPA\r\n", trickle)
    assert sent(events).startswith(b"+ \r\n-ERR AUTH cancelled\r\n+OK Capability list")
    assert core.state is State.COMMAND


@both
def test_bare_auth_lists_mechanisms(trickle: bool) -> None:
    assert sent(feed(Pop3Local(), b"AUTH\r\n", trickle)) == \
        b"+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n"


@both
def test_auth_errors(trickle: bool) -> None:
    core = Pop3Local()
    out = sent(feed(core, b"AUTH XOAUTH2\r\nAUTH PLAIN !!!\r\nAUTH PLAIN a b\r\n"
                          b"AUTH PLAIN " + plain("bob@x", "pw", "alice@x") + b"\r\n", trickle))
    assert out == (b"-ERR Unsupported mechanism XOAUTH2: only AUTH PLAIN (or USER/PASS) is "
                   b"accepted here\r\n"
                   b"-ERR Invalid PLAIN response: invalid base64\r\n"
                   b"-ERR AUTH PLAIN takes at most one initial response\r\n"
                   b"-ERR [AUTH] Acting as another user (authzid) is not supported\r\n")
    assert core.state is State.COMMAND


@both
def test_quit_before_login(trickle: bool) -> None:
    core = Pop3Local()
    events = feed(core, b"QUIT\r\n", trickle)
    assert sent(events) == b"+OK mailproxy signing off\r\n"
    assert closes(events) == [Close("quit")]
    assert core.state is State.CLOSED
    with pytest.raises(RuntimeError):
        core.receive(b"CAPA\r\n")


@both
def test_stls_and_other_commands_get_a_useful_err(trickle: bool) -> None:
    core = Pop3Local()
    out = sent(feed(core, b"STLS\r\nSTAT\r\nAPOP a b\r\n\r\n\xff\xfe\r\nUSER \r\n", trickle))
    lines = out.decode().split("\r\n")
    assert lines[0] == ("-ERR STLS is not available: this listener has no TLS configured; "
                        "connect without TLS (it listens on this machine only)")
    assert lines[1] == ("-ERR STAT is not accepted before login; log in first "
                        "(accepted now: CAPA, USER, PASS, AUTH PLAIN and QUIT)")
    assert lines[2].startswith("-ERR APOP is not supported")
    assert lines[3:] == ["-ERR Empty command line", "-ERR Not a POP3 command",
                         "-ERR USER expects a user name (your e-mail address)", ""]
    assert core.state is State.COMMAND


@both
def test_command_line_limit_is_255_octets_with_crlf(trickle: bool) -> None:
    ok = b"USER " + b"a" * (MAX_LINE - 7) + b"\r\n"
    assert len(ok) == 255
    core = Pop3Local()
    assert sent(feed(core, ok, trickle)) == b"+OK Send PASS\r\n"
    events = feed(core, b"PASS " + b"p" * (MAX_LINE - 6) + b"\r\n", trickle)  # 256 octets
    assert sent(events) == (b"-ERR Line too long: a POP3 command line is limited to 255 "
                            b"octets\r\n")
    assert closes(events) == [Close("line too long")]
    assert logins(events) == []


def test_overlong_line_is_refused_before_its_end_arrives() -> None:
    core = Pop3Local()
    assert core.receive(b"x" * 254) == []
    events = core.receive(b"x")  # 255 octets and no LF: the line cannot fit any more
    assert closes(events) == [Close("line too long")]


@both
def test_auth_response_line_may_exceed_255_octets(trickle: bool) -> None:
    # RFC 5034: the 255-octet limit is for commands, not for the client's SASL response.
    password = "p" * 250
    response = plain("alice@example.com", password)
    assert 255 < len(response) + 2 <= MAX_SASL_LINE
    core = Pop3Local()
    feed(core, b"AUTH PLAIN\r\n", trickle)
    assert logins(feed(core, response + b"\r\n", trickle)) == [
        LoginRequest("alice@example.com", password, "PLAIN")]
    # ... but an initial response on the AUTH command line is a command: 255 octets.
    events = feed(Pop3Local(), b"AUTH PLAIN " + response + b"\r\n", trickle)
    assert closes(events) == [Close("line too long")]


def test_auth_response_line_has_a_limit_too() -> None:
    core = Pop3Local()
    core.receive(b"AUTH PLAIN\r\n")
    events = core.receive(b"A" * MAX_SASL_LINE)
    assert sent(events) == (b"-ERR Line too long: an AUTH response line is limited to "
                            b"1026 octets\r\n")
    assert closes(events) == [Close("line too long")]


@both
def test_pipelined_commands_after_login_are_handed_over(trickle: bool) -> None:
    core = Pop3Local()
    events = feed(core, b"CAPA\r\nUSER a@x\r\nPASS pw\r\nSTAT\r\nLIST\r\n", trickle)
    assert sent(events).endswith(b".\r\n+OK Send PASS\r\n")
    assert logins(events) == [LoginRequest("a@x", "pw", "USER/PASS")]
    assert core.receive(b"RETR 1\r\n") == []  # buffered while the login runs
    reply, trailing = core.login_accepted()
    assert reply == b"+OK Logged in\r\n"
    assert trailing == b"STAT\r\nLIST\r\nRETR 1\r\n"
    assert core.state is State.DONE
    with pytest.raises(RuntimeError):
        core.receive(b"x")


def test_rejected_login_goes_on_with_buffered_commands_and_needs_user_again() -> None:
    core = Pop3Local()
    core.receive(b"USER a@x\r\nPASS bad\r\nPASS again\r\nUSER a@x\r\nPASS good\r\n")
    events = core.login_rejected("-ERR [AUTH] Invalid credentials")
    assert sent(events) == (b"-ERR [AUTH] Invalid credentials\r\n-ERR Send USER first\r\n"
                            b"+OK Send PASS\r\n")
    assert logins(events) == [LoginRequest("a@x", "good", "USER/PASS")]


def test_too_many_failures_close_after_the_reply() -> None:
    core = Pop3Local(max_auth_failures=2)
    core.receive(b"USER a@x\r\nPASS 1\r\n")
    assert closes(core.login_rejected("-ERR [AUTH] Invalid credentials")) == []
    core.receive(b"AUTH PLAIN " + plain("a@x", "2") + b"\r\n")
    events = core.login_rejected("-ERR [SYS/TEMP] try again later")
    assert sent(events) == b"-ERR [SYS/TEMP] try again later\r\n"
    assert closes(events) == [Close("auth failures")]


def test_login_outcome_without_a_pending_login_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        Pop3Local().login_accepted()
    with pytest.raises(RuntimeError):
        Pop3Local().login_rejected("-ERR x")


def test_timeout_closes_with_a_sentence() -> None:
    core = Pop3Local()
    events = core.timeout()
    assert sent(events) == b"-ERR Disconnected: idle for too long before login\r\n"
    assert closes(events) == [Close("idle")]


def test_login_request_repr_hides_the_password() -> None:
    [request] = logins(Pop3Local().receive(b"USER a@x\r\nPASS hunter2\r\n"))
    assert "hunter2" not in repr(request)


# -- issue 12, item 8: reproducers (a few bytes each) --------------------------------------


def _printable(out: bytes) -> bool:
    return all(line.endswith(b"\r\n") and all(0x20 <= c < 0x7F for c in line[:-2])
               for line in out.splitlines(keepends=True))


@pytest.mark.parametrize("command", [b"AUTH \x00\x1b[31mred\r\n", b"AUTH PL\xffAIN\r\n",
                                     b"AUTH X\x7fY\r\n", b"AUTH \xc3\xa9\r\n"])
def test_mechanism_names_are_not_echoed_with_8bit_or_control_bytes(command: bytes) -> None:
    out = sent(Pop3Local().receive(command))
    assert out.startswith(b"-ERR ") and _printable(out), out


def test_bad_commands_before_login_are_capped() -> None:
    # A client that sends junk and never reads made the daemon buffer 32 MB per MB it sent.
    core = Pop3Local()
    events: list[Event] = []
    for _ in range(100):
        events += core.receive(b"XYZ\r\n")
        if core.state is State.CLOSED:
            break
    assert core.state is State.CLOSED and closes(events)
    assert sent(events).count(b"-ERR ") <= 21
