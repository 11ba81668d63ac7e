"""The pre-login IMAP dialogue, driven without sockets; every script also fed a byte at a time."""

from __future__ import annotations

import base64

import pytest

from proxy.core.events import Close, Event, LoginRequest, Send
from proxy.core.imap import CAPABILITIES, ImapLocal, State


def feed(core: ImapLocal, data: bytes, trickle: bool) -> list[Event]:
    if not trickle:
        return core.receive(data)
    events: list[Event] = []
    for i in range(len(data)):
        events += core.receive(data[i : i + 1])
    return events


def sent(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def logins(events: list[Event]) -> list[LoginRequest]:
    return [e for e in events if isinstance(e, LoginRequest)]


both = pytest.mark.parametrize("trickle", [False, True], ids=["whole", "bytewise"])


def test_greeting_advertises_login_and_no_logindisabled() -> None:
    greeting = ImapLocal().greeting()
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert b"AUTH=PLAIN" in greeting and b"SASL-IR" in greeting and b"LITERAL+" in greeting
    assert b"LOGINDISABLED" not in greeting and b"STARTTLS" not in greeting


@both
def test_capability_noop_id(trickle: bool) -> None:
    core = ImapLocal()
    out = sent(feed(core, b"a CAPABILITY\r\nb NOOP\r\nc ID NIL\r\n"
                          b'd ID ("name" "Thunderbird" "version" "128")\r\n', trickle))
    assert out == (f"* CAPABILITY {CAPABILITIES}\r\na OK CAPABILITY completed\r\n"
                   "b OK NOOP completed\r\n"
                   '* ID ("name" "mailproxy" "version" "0.1.0")\r\nc OK ID completed\r\n'
                   '* ID ("name" "mailproxy" "version" "0.1.0")\r\nd OK ID completed\r\n'
                   ).encode()


@both
def test_login_atoms(trickle: bool) -> None:
    core = ImapLocal()
    events = feed(core, b"a1 LOGIN alice@example.com s3cret\r\n", trickle)
    assert logins(events) == [LoginRequest("alice@example.com", "s3cret", "LOGIN")]
    assert core.state is State.LOGIN


@both
def test_login_quoted_with_escapes(trickle: bool) -> None:
    core = ImapLocal()
    events = feed(core, b'a1 LOGIN "alice@example.com" "p\\"a ss\\\\w\xc3\xa4rd"\r\n', trickle)
    assert logins(events) == [LoginRequest("alice@example.com", 'p"a ss\\w\u00e4rd', "LOGIN")]


@both
def test_login_synchronizing_literals_get_continuations(trickle: bool) -> None:
    core = ImapLocal()
    events = feed(core, b"a1 LOGIN {5}\r\n", trickle)
    assert sent(events) == b"+ Ready for literal data\r\n"
    events = feed(core, b"alice {6}\r\n", trickle)
    assert sent(events) == b"+ Ready for literal data\r\n"
    events = feed(core, b"se\r\nt \r\n", trickle)  # a literal may hold CRLF and spaces
    assert logins(events) == [LoginRequest("alice", "se\r\nt ", "LOGIN")]


@both
def test_login_non_synchronizing_literals(trickle: bool) -> None:
    core = ImapLocal()
    events = feed(core, b"a1 LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n", trickle)
    assert sent(events) == b""
    assert logins(events) == [LoginRequest("alice", "secret", "LOGIN")]


@both
def test_authenticate_plain_with_initial_response(trickle: bool) -> None:
    core = ImapLocal()
    ir = base64.b64encode(b"\0bob@example.com\0pw")
    events = feed(core, b"x AUTHENTICATE PLAIN " + ir + b"\r\n", trickle)
    assert logins(events) == [LoginRequest("bob@example.com", "pw", "PLAIN")]


@both
def test_authenticate_plain_with_continuation(trickle: bool) -> None:
    core = ImapLocal()
    events = feed(core, b"x authenticate plain\r\n", trickle)
    assert sent(events) == b"+ \r\n"
    ir = base64.b64encode(b"bob@example.com\0bob@example.com\0pw")
    events = feed(core, ir + b"\r\n", trickle)
    assert logins(events) == [LoginRequest("bob@example.com", "pw", "PLAIN")]


@both
def test_authenticate_cancel_and_bad_base64(trickle: bool) -> None:
    core = ImapLocal()
    events = feed(core, b"x AUTHENTICATE PLAIN\r\n*\r\ny AUTHENTICATE PLAIN !!!\r\n", trickle)
    assert sent(events) == (b"+ \r\nx BAD AUTHENTICATE cancelled\r\n"
                            b"y BAD Invalid PLAIN response: invalid base64\r\n")
    assert core.state is State.COMMAND


def test_authenticate_other_mechanism_and_authzid() -> None:
    core = ImapLocal()
    out = sent(core.receive(b"x AUTHENTICATE XOAUTH2 abc\r\n"))
    assert out == (b"x NO Unsupported mechanism XOAUTH2: "
                   b"only AUTHENTICATE PLAIN is accepted here\r\n")
    ir = base64.b64encode(b"boss@example.com\0bob@example.com\0pw")
    out = sent(core.receive(b"y AUTHENTICATE PLAIN " + ir + b"\r\n"))
    assert out.startswith(b"y NO [AUTHORIZATIONFAILED] ")


@both
def test_other_commands_before_login_get_bad(trickle: bool) -> None:
    core = ImapLocal()
    out = sent(feed(core, b"s1 SELECT INBOX\r\nq FROB\r\n", trickle))
    assert out == (b"s1 BAD SELECT is not accepted before login; log in first (accepted now: "
                   b"CAPABILITY, NOOP, ID, LOGIN, AUTHENTICATE PLAIN and LOGOUT)\r\n"
                   b"q BAD FROB is not accepted before login; log in first (accepted now: "
                   b"CAPABILITY, NOOP, ID, LOGIN, AUTHENTICATE PLAIN and LOGOUT)\r\n")


def test_starttls_gets_a_clear_no() -> None:
    out = sent(ImapLocal().receive(b"t STARTTLS\r\n"))
    assert out.startswith(b"t NO STARTTLS is not available")


@pytest.mark.parametrize("line, reply", [
    (b"\r\n", b"* BAD Empty command line\r\n"),
    (b"+x LOGIN a b\r\n", b"* BAD Missing or invalid command tag\r\n"),
    (b"a\r\n", b"a BAD Missing command\r\n"),
    (b"a LOGIN onlyuser\r\n", b"a BAD LOGIN expects a user name and a password\r\n"),
    (b'a LOGIN "open pw\r\n', b"a BAD Unterminated quoted string\r\n"),
    (b'a LOGIN u "\\n"\r\n', b'a BAD Only \\" and \\\\ may be escaped in a string\r\n'),
    (b"a LOGIN u \xff\xfe\r\n", b"a BAD Strings must be UTF-8\r\n"),
    (b"a \xffLOGIN\r\n", b'a BAD "\\xffLOGIN" is not accepted before login; log in first '
     b"(accepted now: CAPABILITY, NOOP, ID, LOGIN, AUTHENTICATE PLAIN and LOGOUT)\r\n"),
    (b"a \x7fX\r\n", b"a BAD Unexpected character \"\\x7f\" in command\r\n"),
    (b"a AUTHENTICATE \xff\r\n",
     b'a NO Unsupported mechanism "\\xff": only AUTHENTICATE PLAIN is accepted here\r\n'),
])
def test_malformed_input_gets_bad_and_session_continues(line: bytes, reply: bytes) -> None:
    core = ImapLocal()
    assert sent(core.receive(line)) == reply
    assert core.state is State.COMMAND
    assert sent(core.receive(b"n NOOP\r\n")) == b"n OK NOOP completed\r\n"


@both
def test_logout(trickle: bool) -> None:
    core = ImapLocal()
    events = feed(core, b"z LOGOUT\r\n", trickle)
    assert sent(events) == b"* BYE mailproxy logging out\r\nz OK LOGOUT completed\r\n"
    assert isinstance(events[-1], Close)


def test_line_too_long_closes_with_bye() -> None:
    core = ImapLocal(max_line=1024)
    events = core.receive(b"a LOGIN " + b"x" * 2000)
    assert sent(events) == b"* BYE Command line too long\r\n"
    assert isinstance(events[-1], Close) and core.state is State.CLOSED


def test_oversized_synchronizing_literal_is_refused_without_continuation() -> None:
    core = ImapLocal(max_literal=100)
    events = core.receive(b"a LOGIN {5000}\r\n")
    assert sent(events) == b"a BAD Literal of 5000 octets is larger than 100 before login\r\n"
    assert sent(core.receive(b"b NOOP\r\n")) == b"b OK NOOP completed\r\n"


def test_oversized_non_synchronizing_literal_closes() -> None:
    core = ImapLocal(max_literal=100)
    events = core.receive(b"a LOGIN {5000+}\r\n" + b"x" * 50)
    assert sent(events).endswith(b"* BYE Cannot continue after that error\r\n")
    assert isinstance(events[-1], Close)


def test_idle_timeout_says_bye() -> None:
    events = ImapLocal().timeout()
    assert sent(events) == b"* BYE Autologout: idle for too long before login\r\n"
    assert isinstance(events[-1], Close)


@both
def test_pipelined_commands_after_login_are_handed_over(trickle: bool) -> None:
    core = ImapLocal()
    events = feed(core, b"a LOGIN u p\r\nb SELECT INBOX\r\nc FETCH 1 (FLAGS)\r\n", trickle)
    assert len(logins(events)) == 1
    reply, trailing = core.login_accepted("IMAP4rev1 IDLE")
    assert reply == b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
    assert trailing == b"b SELECT INBOX\r\nc FETCH 1 (FLAGS)\r\n"
    assert core.state is State.DONE
    with pytest.raises(RuntimeError):
        core.receive(b"more")


def test_rejected_login_resumes_with_buffered_commands() -> None:
    core = ImapLocal()
    core.receive(b"a LOGIN u wrong\r\nb LOGIN u right\r\n")
    events = core.login_rejected("NO [AUTHENTICATIONFAILED] Invalid credentials")
    assert sent(events) == b"a NO [AUTHENTICATIONFAILED] Invalid credentials\r\n"
    assert logins(events) == [LoginRequest("u", "right", "LOGIN")]


def test_too_many_failed_logins_close() -> None:
    core = ImapLocal(max_auth_failures=2)
    core.receive(b"a LOGIN u x\r\n")
    core.login_rejected("NO nope")
    core.receive(b"b LOGIN u y\r\n")
    events = core.login_rejected("NO nope")
    assert sent(events) == b"b NO nope\r\n* BYE Too many failed logins\r\n"
    assert isinstance(events[-1], Close)


def test_login_request_repr_hides_password() -> None:
    assert "hunter2" not in repr(LoginRequest("u", "hunter2", "LOGIN"))


def test_random_input_never_raises_and_every_reply_is_well_formed() -> None:
    """Junk, fragments and half-valid commands: the core answers, it never crashes."""
    import random
    import re

    pieces = [b"a", b"LOGIN", b"AUTHENTICATE", b"PLAIN", b"{3}", b"{2+}", b"{99999}", b'"',
              b"\\", b"(", b")", b" ", b"\r\n", b"\n", b"*", b"=", b"\x00", b"\xff", b"+",
              b"CAPABILITY", b"ID", b"NIL", b"x" * 300, b"AAA=", b"NOOP", b"STARTTLS"]
    reply = re.compile(rb"^(\* |\+ |[^\s(){%*\"\\\]+]+ )[^\r\n]*\r\n$")
    rng = random.Random(1234)
    for _ in range(3000):
        core = ImapLocal(max_line=256, max_literal=64)
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        step = 1 if rng.random() < 0.3 else len(data)
        events: list[Event] = []
        for i in range(0, len(data), step):  # as the shell does: stop at a close
            if core.state is State.CLOSED:
                break
            events += core.receive(data[i : i + step])
            while core.state is State.LOGIN:
                events += core.login_rejected("NO nope")
        for event in events:
            if isinstance(event, Send):
                for line in event.data.splitlines(keepends=True):
                    assert reply.match(line), (data, line)


# -- issue 12, items 7 and 8: reproducers (a few bytes each) -------------------------------


def _printable(out: bytes) -> bool:
    return all(line.endswith(b"\r\n") and all(0x20 <= c < 0x7F for c in line[:-2])
               for line in out.splitlines(keepends=True))


@both
def test_8bit_tag_is_answered_untagged_not_with_a_replacement_character(trickle: bool) -> None:
    # The reply was tagged "\xef\xbf\xbd" (U+FFFD): the client cannot match it.
    out = sent(feed(ImapLocal(), b"\xff NOOP\r\nb\xc3\xa9 NOOP\r\n", trickle))
    assert _printable(out), out
    assert out.startswith(b"* BAD ") and out.count(b"* BAD ") == 2, out


@both
def test_close_bracket_is_allowed_in_a_tag(trickle: bool) -> None:
    # RFC 3501: tag = 1*<any ASTRING-CHAR except "+">, and ASTRING-CHAR includes "]".
    assert sent(feed(ImapLocal(), b"a]1 NOOP\r\n", trickle)) == b"a]1 OK NOOP completed\r\n"


@both
def test_unquoted_login_arguments_may_hold_a_close_bracket(trickle: bool) -> None:
    events = feed(ImapLocal(), b"a LOGIN us]er@example.com pa]ss\r\n", trickle)
    assert logins(events) == [LoginRequest("us]er@example.com", "pa]ss", "LOGIN")]


@pytest.mark.parametrize("command", [b"a AUTHENTICATE PL\xffAIN\r\n",
                                     b"a AUTHENTICATE \x1b[31mX\r\n",
                                     b"a XY\xc3\xa9Z\r\n", b"a NOOP \x7f\xe9\r\n",
                                     b"a LOGIN \"\x00\" x\r\n", b"a \xe9\r\n"])
def test_replies_never_echo_8bit_or_control_bytes(command: bytes) -> None:
    out = sent(ImapLocal().receive(command))
    assert out and _printable(out), out


def test_rfc2971_sized_id_before_login_is_accepted() -> None:
    # RFC 2971: up to 30 field/value pairs, values up to 1024 octets; imaptest sends one.
    pairs = b" ".join(b'"field-%02d" "%s"' % (i, b"v" * 1024) for i in range(30))
    core = ImapLocal()
    out = sent(core.receive(b"a ID (" + pairs + b")\r\nb NOOP\r\n"))
    assert out.endswith(b"a OK ID completed\r\nb OK NOOP completed\r\n"), out[:200]
    assert core.state is State.COMMAND


def test_line_over_the_id_allowance_still_closes() -> None:
    core = ImapLocal()
    events = core.receive(b"a ID (" + b"x" * 100_000)
    assert sent(events).startswith(b"* BYE ") and any(isinstance(e, Close) for e in events)


def test_bad_commands_before_login_are_capped() -> None:
    # A client that sends junk and never reads made the daemon buffer 32 MB per MB it sent.
    core = ImapLocal()
    events: list[Event] = []
    for _ in range(100):
        events += core.receive(b"a X\r\n")
        if core.state is State.CLOSED:
            break
    assert core.state is State.CLOSED
    out = sent(events)
    assert out.count(b"a BAD ") <= 20 and b"* BYE " in out, out[-200:]


def test_literal_right_after_the_tag_is_not_a_tag() -> None:
    # Found by bench/fuzz.py: "-{3}" was answered "- BAD", a tag the client never sent.
    core = ImapLocal()
    out = sent(core.receive(b"-{3}\r\nabc\r\n"))
    assert out == b"+ Ready for literal data\r\n* BAD Missing or invalid command tag\r\n"
