"""Sign-in links, sessions and CSRF tokens of the admin page, on a fake clock."""

from __future__ import annotations

from proxy.admin.auth import MAX_LINKS, MAX_SESSIONS, Gatekeeper
from tests.support.clock import ManualClock as Clock


def test_link_once_and_only_in_time() -> None:
    clock = Clock()
    gate = Gatekeeper(clock, link_lifetime=300)
    token = gate.issue_link()
    assert len(token) >= 43  # 256 bits
    got = gate.redeem(token)
    assert got is not None
    assert gate.redeem(token) is None
    late = gate.issue_link()
    clock.now += 300
    assert gate.redeem(late) is None


def test_secrets_are_kept_as_digests_only() -> None:
    gate = Gatekeeper(Clock())
    token = gate.issue_link()
    got = gate.redeem(token)
    assert got is not None
    cookie, session = got
    state = repr(vars(gate)) + repr(session)
    assert token not in state and cookie not in state and session.csrf not in state


def test_session_idle_and_absolute_expiry() -> None:
    clock = Clock()
    gate = Gatekeeper(clock, idle_timeout=60, max_age=150)
    got = gate.redeem(gate.issue_link())
    assert got is not None
    cookie, _ = got
    for _ in range(2):
        clock.now += 59
        assert gate.session(cookie) is not None  # each use keeps it alive...
    clock.now += 59
    assert gate.session(cookie) is None  # ...but not past max_age
    got = gate.redeem(gate.issue_link())
    assert got is not None
    clock.now += 60
    assert gate.session(got[0]) is None
    assert gate.session(None) is None and gate.session("made-up") is None


def test_csrf_check() -> None:
    got = Gatekeeper(Clock()).redeem(Gatekeeper(Clock()).issue_link())
    assert got is None  # a link of another gatekeeper (another daemon run) is no link
    gate = Gatekeeper(Clock())
    got = gate.redeem(gate.issue_link())
    assert got is not None
    session = got[1]
    assert session.check_csrf(session.csrf)
    assert not session.check_csrf(None) and not session.check_csrf("")
    assert not session.check_csrf(session.csrf + "x")


def test_signing_out_and_bounded_tables() -> None:
    clock = Clock()
    gate = Gatekeeper(clock)
    tokens = [gate.issue_link() for _ in range(MAX_LINKS + 5)]
    assert gate.redeem(tokens[0]) is None  # the oldest links made room
    assert gate.redeem(tokens[-1]) is not None
    cookies = []
    for _ in range(MAX_SESSIONS + 3):
        clock.now += 1
        got = gate.redeem(gate.issue_link())
        assert got is not None
        cookies.append(got[0])
    assert gate.session(cookies[0]) is None and gate.session(cookies[-1]) is not None
    gate.end(cookies[-1])
    assert gate.session(cookies[-1]) is None
