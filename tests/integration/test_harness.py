"""Self-tests of the integration harness: token server, Dovecot, test CA.

Talks to the servers with stdlib clients only (imaplib, poplib) and httpx; does not
import ``proxy``.
"""

from __future__ import annotations

import base64
import imaplib
import json
import poplib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import httpx
import pytest

from tests.support.dovecot import Dovecot
from tests.support.tlsca import TestCA
from tests.support.tokenserver import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TokenServer


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(user: str, token: str) -> bytes:
    return f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()


class SaslClient:
    """imaplib authobject: initial response first, then answers a failure challenge.

    Answers XOAUTH2's failure challenge with an empty line and OAUTHBEARER's with ``\\x01``.
    """

    def __init__(self, initial: bytes, failure_answer: bytes = b"") -> None:
        self.initial = initial
        self.failure_answer = failure_answer
        self.challenges: list[bytes] = []

    def __call__(self, challenge: bytes) -> bytes:
        self.challenges.append(challenge)
        return self.initial if len(self.challenges) == 1 else self.failure_answer


def ca_context(test_ca: TestCA) -> ssl.SSLContext:
    """Trusts only the test CA (not the system store), verifies the hostname."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(test_ca.ca_cert))
    return ctx


def imaps(dovecot: Dovecot, test_ca: TestCA) -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL(
        dovecot.host, dovecot.imaps_port, ssl_context=ca_context(test_ca), timeout=10
    )


MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Subject: harness self-test\r\n"
    b"Message-ID: <harness-1@example.test>\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b"this body must come back byte for byte.\r\n"
    b".leading dot and trailing spaces   \r\n"
)


# ---------------------------------------------------------------- Dovecot + IMAP


def test_imaps_xoauth2_login_and_fetch_delivered_message(
    dovecot: Dovecot, token_server: TokenServer, test_ca: TestCA, mail_user: str
) -> None:
    dovecot.deliver(mail_user, MESSAGE)
    token = token_server.authority.issue_access_token(mail_user)
    with imaps(dovecot, test_ca) as imap:
        assert "AUTH=XOAUTH2" in imap.capabilities
        assert "AUTH=OAUTHBEARER" in imap.capabilities
        typ, _ = imap.authenticate("XOAUTH2", SaslClient(xoauth2(mail_user, token)))
        assert typ == "OK"
        typ, data = imap.select("INBOX", readonly=True)
        assert typ == "OK" and data == [b"1"]
        typ, fetched = imap.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK"
        part = fetched[0]
        assert isinstance(part, tuple)
        assert part[1] == MESSAGE
    assert (token, True) in token_server.authority.introspection_requests


def test_imap_plaintext_port_oauthbearer(
    dovecot: Dovecot, token_server: TokenServer, mail_user: str
) -> None:
    token = token_server.authority.issue_access_token(mail_user)
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10) as imap:
        typ, _ = imap.authenticate("OAUTHBEARER", SaslClient(oauthbearer(mail_user, token)))
        assert typ == "OK"
        assert imap.select("INBOX")[0] == "OK"


def _failed_login(
    dovecot: Dovecot, test_ca: TestCA, user: str, token: str, mech: str = "XOAUTH2"
) -> tuple[str, SaslClient]:
    make: Callable[[str, str], bytes] = xoauth2 if mech == "XOAUTH2" else oauthbearer
    client = SaslClient(make(user, token), b"" if mech == "XOAUTH2" else b"\x01")
    with imaps(dovecot, test_ca) as imap:
        with pytest.raises(imaplib.IMAP4.error) as excinfo:
            imap.authenticate(mech, client)
        # the connection stays usable after a failed AUTHENTICATE
        assert imap.noop()[0] == "OK"
    return str(excinfo.value), client


@pytest.mark.parametrize("mech", ["XOAUTH2", "OAUTHBEARER"])
def test_unknown_token_gets_authenticationfailed(
    dovecot: Dovecot, test_ca: TestCA, mail_user: str, mech: str
) -> None:
    error, client = _failed_login(dovecot, test_ca, mail_user, "at_not-a-real-token", mech)
    assert "[AUTHENTICATIONFAILED]" in error
    # Failure dialogue: a JSON challenge before the final NO (never hard-code the status).
    assert len(client.challenges) == 2
    # Dovecot: XOAUTH2 {"status":"401",...}, OAUTHBEARER {"status":"invalid_token",...}
    challenge = json.loads(client.challenges[1])
    assert challenge["status"] == ("401" if mech == "XOAUTH2" else "invalid_token")


def test_invalidated_and_expired_tokens_fail(
    dovecot: Dovecot, token_server: TokenServer, test_ca: TestCA, mail_user: str
) -> None:
    authority = token_server.authority
    token = authority.issue_access_token(mail_user)
    assert authority.invalidate_access_tokens(mail_user) == 1
    assert "[AUTHENTICATIONFAILED]" in _failed_login(dovecot, test_ca, mail_user, token)[0]
    expired = authority.issue_access_token(mail_user, lifetime=-1)
    assert "[AUTHENTICATIONFAILED]" in _failed_login(dovecot, test_ca, mail_user, expired)[0]


def test_token_of_another_user_fails(
    dovecot: Dovecot, token_server: TokenServer, test_ca: TestCA, mail_user: str
) -> None:
    other = token_server.authority.issue_access_token("someone-else@example.test")
    assert "[AUTHENTICATIONFAILED]" in _failed_login(dovecot, test_ca, mail_user, other)[0]


def test_long_access_token_login(
    dovecot: Dovecot, token_server: TokenServer, test_ca: TestCA, mail_user: str
) -> None:
    token_server.authority.access_token_length = 3000
    token = token_server.authority.issue_access_token(mail_user)
    assert len(token) == 3000
    with imaps(dovecot, test_ca) as imap:
        assert imap.authenticate("XOAUTH2", SaslClient(xoauth2(mail_user, token)))[0] == "OK"


def test_dovecot_stop_and_start_same_ports(
    dovecot: Dovecot, token_server: TokenServer, test_ca: TestCA, mail_user: str
) -> None:
    dovecot.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((dovecot.host, dovecot.imaps_port), timeout=2)
    dovecot.start()
    token = token_server.authority.issue_access_token(mail_user)
    with imaps(dovecot, test_ca) as imap:
        assert imap.authenticate("XOAUTH2", SaslClient(xoauth2(mail_user, token)))[0] == "OK"


# ------------------------------------------------------------------------- POP3


def _pop3_auth_xoauth2(pop: poplib.POP3, user: str, token: str) -> bytes:
    """Two-step AUTH (the token does not fit a 255-octet POP3 line)."""
    shortcmd = cast(Any, pop)._shortcmd  # private, but the simplest raw command API
    resp: bytes = shortcmd("AUTH XOAUTH2")
    assert resp.startswith(b"+")
    answer: bytes = shortcmd(base64.b64encode(xoauth2(user, token)).decode())
    return answer


def test_pop3s_xoauth2_two_step_login(
    dovecot: Dovecot, token_server: TokenServer, test_ca: TestCA, mail_user: str
) -> None:
    dovecot.deliver(mail_user, MESSAGE)
    token = token_server.authority.issue_access_token(mail_user)
    pop = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=ca_context(test_ca))
    try:
        assert _pop3_auth_xoauth2(pop, mail_user, token).startswith(b"+OK")
        assert pop.stat() == (1, len(MESSAGE))
        _, lines, _ = pop.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == MESSAGE
    finally:
        pop.quit()


def test_pop3_plaintext_bad_token_failure_dialogue(dovecot: Dovecot, mail_user: str) -> None:
    pop = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    try:
        challenge = _pop3_auth_xoauth2(pop, mail_user, "at_bogus")
        # "+ <base64 JSON>": the client must answer with an empty line
        assert challenge.startswith(b"+ ")
        assert "status" in json.loads(base64.b64decode(challenge[2:]))
        with pytest.raises(poplib.error_proto) as excinfo:
            cast(Any, pop)._shortcmd("")
        assert str(excinfo.value).startswith("b'-ERR [AUTH]")
    finally:
        pop.quit()


# ------------------------------------------------------------------ token server


def _post(url: str, data: dict[str, str], basic: bool = True) -> httpx.Response:
    auth = (TEST_CLIENT_ID, TEST_CLIENT_SECRET) if basic else None
    if not basic:
        data = {**data, "client_id": TEST_CLIENT_ID, "client_secret": TEST_CLIENT_SECRET}
    return httpx.post(url, data=data, auth=auth, timeout=10)


@pytest.mark.parametrize("basic", [True, False], ids=["client_secret_basic", "client_secret_post"])
def test_refresh_grant_with_rotation(
    token_server: TokenServer, mail_user: str, basic: bool
) -> None:
    authority = token_server.authority
    authority.rotate_refresh_tokens = True
    authority.access_token_lifetime = 120
    rt = authority.issue_refresh_token(mail_user, TEST_CLIENT_ID)
    r = _post(token_server.token_url, {"grant_type": "refresh_token", "refresh_token": rt}, basic)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 120
    assert body["refresh_token"] != rt
    info = httpx.post(token_server.introspection_url, data={"token": body["access_token"]})
    assert info.json()["active"] is True
    assert info.json()["email"] == mail_user
    assert info.json()["exp"] - time.time() == pytest.approx(120, abs=5)

    again = _post(
        token_server.token_url, {"grant_type": "refresh_token", "refresh_token": rt}, basic
    )
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"
    newer = _post(
        token_server.token_url,
        {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]},
        basic,
    )
    assert newer.status_code == 200
    assert [(g, u) for g, u, _ in authority.token_requests] == [("refresh_token", mail_user)] * 3


def test_refresh_without_rotation_and_revocation(token_server: TokenServer, mail_user: str) -> None:
    authority = token_server.authority
    rt = authority.issue_refresh_token(mail_user, TEST_CLIENT_ID)
    form = {"grant_type": "refresh_token", "refresh_token": rt}
    first = _post(token_server.token_url, form)
    assert first.status_code == 200 and "refresh_token" not in first.json()
    assert _post(token_server.token_url, form).status_code == 200
    authority.revoke_refresh_token(rt)
    r = _post(token_server.token_url, form)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")


def test_client_credentials_and_errors(token_server: TokenServer, mail_user: str) -> None:
    authority = token_server.authority
    authority.register_client("app-only", "app-secret", app_only_user=mail_user)
    r = httpx.post(
        token_server.token_url,
        data={"grant_type": "client_credentials", "scope": "x/.default"},
        auth=("app-only", "app-secret"),
    )
    assert r.status_code == 200, r.text
    info = httpx.post(token_server.introspection_url, data={"token": r.json()["access_token"]})
    assert info.json()["email"] == mail_user

    bad = httpx.post(
        token_server.token_url,
        data={"grant_type": "client_credentials"},
        auth=("app-only", "wrong"),
    )
    assert (bad.status_code, bad.json()["error"]) == (401, "invalid_client")
    unsupported = _post(token_server.token_url, {"grant_type": "password"})
    assert (unsupported.status_code, unsupported.json()["error"]) == (
        400,
        "unsupported_grant_type",
    )
    inactive = httpx.post(token_server.introspection_url, data={"token": "nope"})
    assert inactive.json() == {"active": False}


def test_fail_next_and_delay(token_server: TokenServer, mail_user: str) -> None:
    authority = token_server.authority
    rt = authority.issue_refresh_token(mail_user, TEST_CLIENT_ID)
    form = {"grant_type": "refresh_token", "refresh_token": rt}
    authority.fail_next(503, count=2)
    assert _post(token_server.token_url, form).status_code == 503
    r429 = _post(token_server.token_url, form)
    assert r429.status_code == 503
    assert _post(token_server.token_url, form).status_code == 200

    authority.token_delay = 0.3
    # Five requests sent at once, each timed from its own send: served one at a time, their
    # five 0.3 s delays alone would span 1.5 s. The clients are made beforehand (on a busy
    # machine making one takes a while, which is not the server's doing).
    clients = [httpx.Client(auth=(TEST_CLIENT_ID, TEST_CLIENT_SECRET), timeout=10)
               for _ in range(5)]
    start = threading.Barrier(len(clients))
    results: list[tuple[int, float, float]] = []

    def worker(client: httpx.Client) -> None:
        start.wait(10)
        sent = time.monotonic()
        status = client.post(token_server.token_url, data=form).status_code
        results.append((status, sent, time.monotonic()))

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for c in clients:
            c.close()
    assert [status for status, _, _ in results] == [200] * 5
    span = max(done for _, _, done in results) - min(sent for _, sent, _ in results)
    assert span < 1.5, span  # served concurrently
    assert len(authority.token_requests) == 8


def test_token_listener_stop_and_restart(token_server: TokenServer, mail_user: str) -> None:
    rt = token_server.authority.issue_refresh_token(mail_user, TEST_CLIENT_ID)
    form = {"grant_type": "refresh_token", "refresh_token": rt}
    token_server.stop_token_listener()
    with pytest.raises(httpx.ConnectError):
        _post(token_server.token_url, form)
    # introspection (what Dovecot uses) keeps working
    assert httpx.post(token_server.introspection_url, data={"token": "x"}).status_code == 200
    token_server.start_token_listener()
    assert _post(token_server.token_url, form).status_code == 200


def test_introspection_down_gives_temporary_failure(
    dovecot: Dovecot, token_server: TokenServer, test_ca: TestCA, mail_user: str
) -> None:
    token = token_server.authority.issue_access_token(mail_user)
    token_server.stop_introspection_listener()
    try:
        with imaps(dovecot, test_ca) as imap:
            with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
                imap.authenticate("XOAUTH2", SaslClient(xoauth2(mail_user, token)))
    finally:
        token_server.start_introspection_listener()
    with imaps(dovecot, test_ca) as imap:
        assert imap.authenticate("XOAUTH2", SaslClient(xoauth2(mail_user, token)))[0] == "OK"
