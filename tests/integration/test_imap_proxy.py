"""The IMAP proxy end to end: real clients -> proxy -> real Dovecot (oauth2 passdb over TLS)."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from pathlib import Path

import aioimaplib
import pytest
from pydantic import SecretStr

from proxy.config import VaultSettings
from proxy.tokens.store import TokenState
from proxy.vault import Vault
from tests.support.dovecot import Dovecot
from tests.support.imapclient import RawImap, fetch_direct, tagged_status
from tests.support.proxyrun import LOCAL_PASSWORD, ProxyHarness
from tests.support.servers import free_port
from tests.support.tokenserver import TEST_CLIENT_SECRET, TokenServer

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: Bob <bob@example.test>\r\n"
           b"Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\nMessage-ID: <m1@example.test>\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           + "Grüße aus dem Test.\r\n".encode() + b".leading dot\r\n" + b"x" * 5000 + b"\r\n")


@pytest.fixture
def harness(tmp_path: Path, token_server: TokenServer, dovecot: Dovecot) -> ProxyHarness:
    return ProxyHarness(tmp_path / "state", token_server, dovecot)


async def connect(daemon_addr: tuple[str, int]) -> RawImap:
    return await RawImap.connect(*daemon_addr)


async def test_login_quoted_then_session_is_relayed(harness: ProxyHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await connect(daemon.address("imap"))
        assert b"AUTH=PLAIN" in client.greeting
        reply = await client.login(mail_user, LOCAL_PASSWORD)
        status = tagged_status(reply)
        assert status.startswith(b"t1 OK [CAPABILITY IMAP4rev1 ")  # Dovecot's post-login caps
        assert b"IDLE" in status
        select = await client.command("SELECT INBOX")
        assert tagged_status(select).startswith(b"t2 OK [READ-WRITE]")
        logout = await client.command("LOGOUT")  # Dovecot's own answer, relayed
        assert logout.startswith(b"* BYE") and tagged_status(logout).startswith(b"t3 OK")
        assert await client.reader.read() == b""  # and the proxy closes after it
        await client.close()


async def test_login_with_literals_and_pipelined_command(harness: ProxyHarness,
                                                        mail_user: str) -> None:
    harness.provision(mail_user)
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await connect(daemon.address("imap"))
        user, pw = mail_user.encode(), LOCAL_PASSWORD.encode()
        await client.send(b"a1 LOGIN {%d}\r\n" % len(user))
        assert await client.reader.readline() == b"+ Ready for literal data\r\n"
        await client.send(user + b" {%d}\r\n" % len(pw))
        assert await client.reader.readline() == b"+ Ready for literal data\r\n"
        # The password literal, then a command sent before the login answer: it must reach
        # Dovecot after the login, not be lost.
        await client.send(pw + b"\r\na2 SELECT INBOX\r\n")
        assert tagged_status(await client.read_response("a1")).startswith(b"a1 OK")
        assert tagged_status(await client.read_response("a2")).startswith(b"a2 OK [READ-WRITE]")
        await client.close()


async def test_non_synchronizing_literals(harness: ProxyHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await connect(daemon.address("imap"))
        user, pw = mail_user.encode(), LOCAL_PASSWORD.encode()
        await client.send(b"a1 LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n" % (len(user), user, len(pw), pw))
        assert tagged_status(await client.read_response("a1")).startswith(b"a1 OK")
        await client.close()


@pytest.mark.parametrize("initial_response", [True, False])
async def test_authenticate_plain(harness: ProxyHarness, mail_user: str,
                                  initial_response: bool) -> None:
    harness.provision(mail_user)
    creds = base64.b64encode(f"\0{mail_user}\0{LOCAL_PASSWORD}".encode())
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await connect(daemon.address("imap"))
        if initial_response:
            await client.send(b"p1 AUTHENTICATE PLAIN " + creds + b"\r\n")
        else:
            await client.send(b"p1 AUTHENTICATE PLAIN\r\n")
            assert await client.reader.readline() == b"+ \r\n"
            await client.send(creds + b"\r\n")
        assert tagged_status(await client.read_response("p1")).startswith(b"p1 OK [CAPABILITY")
        await client.close()


async def test_fetch_is_byte_identical_to_direct(harness: ProxyHarness, dovecot: Dovecot,
                                                 token_server: TokenServer,
                                                 mail_user: str) -> None:
    harness.provision(mail_user)
    for i in range(3):
        dovecot.deliver(mail_user, MESSAGE.replace(b"m1@", b"m%d@" % i))
    expected = await fetch_direct(dovecot.host, dovecot.imaps_port, dovecot.ca_file, mail_user,
                                  token_server.authority.issue_access_token(mail_user),
                                  "FETCH 1:* (UID RFC822.SIZE BODY.PEEK[])")
    assert expected.count(b"* ") >= 3 and MESSAGE[:40] in expected

    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await connect(daemon.address("imap"))
        await client.login(mail_user, LOCAL_PASSWORD)
        await client.command("SELECT INBOX")
        through_proxy = await client.command("FETCH 1:* (UID RFC822.SIZE BODY.PEEK[])")
        await client.close()
    # \Recent flags and Dovecot's timing figures in the tagged line differ between sessions.
    untagged = expected.rsplit(b"t3 OK", 1)[0]
    assert through_proxy.rsplit(b"t3 OK", 1)[0] == untagged
    assert tagged_status(through_proxy).startswith(b"t3 OK Fetch completed")


async def test_real_client_append_and_idle(harness: ProxyHarness, dovecot: Dovecot,
                                           mail_user: str) -> None:
    harness.provision(mail_user)
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        host, port = daemon.address("imap")
        watcher = aioimaplib.IMAP4(host=host, port=port, timeout=20)
        await watcher.wait_hello_from_server()
        assert (await watcher.login(mail_user, LOCAL_PASSWORD)).result == "OK"
        assert (await watcher.select("INBOX")).result == "OK"
        idle = await watcher.idle_start(timeout=20)

        writer = aioimaplib.IMAP4(host=host, port=port, timeout=20)
        await writer.wait_hello_from_server()
        assert (await writer.login(mail_user, LOCAL_PASSWORD)).result == "OK"
        appended = await writer.append(MESSAGE, mailbox="INBOX", flags="(\\Seen)")
        assert appended.result == "OK"

        pushed = await asyncio.wait_for(watcher.wait_server_push(), 15)
        assert any(b"EXISTS" in (line if isinstance(line, bytes) else line.encode())
                   for line in pushed), pushed
        watcher.idle_done()
        assert (await asyncio.wait_for(idle, 10)).result == "OK"

        assert (await writer.select("INBOX")).result == "OK"
        fetched = await writer.fetch("1", "(BODY.PEEK[])")
        assert fetched.result == "OK"
        assert any(isinstance(line, bytes | bytearray) and bytes(line) == MESSAGE
                   for line in fetched.lines)
        await writer.logout()
        await watcher.logout()
    # APPEND went through to Dovecot's own storage (maildir files use bare LF).
    stored = list(dovecot.maildir(mail_user).glob("cur/*")) + \
        list(dovecot.maildir(mail_user).glob("new/*"))
    assert [p.read_bytes() for p in stored] == [MESSAGE.replace(b"\r\n", b"\n")]


async def test_wrong_password_is_refused_without_touching_tokens(
        harness: ProxyHarness, token_server: TokenServer, mail_user: str) -> None:
    harness.provision(mail_user)
    state_before = harness.store(mail_user).load(mail_user)
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await connect(daemon.address("imap"))
        reply = await client.login(mail_user, "wrong password")
        assert tagged_status(reply) == b"t1 NO [AUTHENTICATIONFAILED] Invalid credentials"
        reply = await client.login("nobody@example.test", LOCAL_PASSWORD)
        assert tagged_status(reply) == b"t2 NO [AUTHENTICATIONFAILED] Invalid credentials"
        # The session goes on: the right password still works after mistakes.
        assert tagged_status(await client.login(mail_user, LOCAL_PASSWORD)).startswith(b"t3 OK")
        await client.close()
    assert len(token_server.authority.requests_for()) == 1  # only the good login asked
    assert harness.store(mail_user).load(mail_user).refresh_token == \
        state_before.refresh_token


async def test_expired_access_token_is_refreshed_between_logins(
        harness: ProxyHarness, token_server: TokenServer, mail_user: str) -> None:
    token_server.authority.access_token_lifetime = 2
    token_server.authority.rotate_refresh_tokens = True
    first_rt = harness.provision(mail_user)
    settings = harness.settings(harness.account(mail_user), refresh_before=0, jitter=0)
    settings.imap.spare_sessions = 0  # the second login logs in upstream, not a spare
    async with harness.run(settings) as daemon:
        client = await connect(daemon.address("imap"))
        assert tagged_status(await client.login(mail_user, LOCAL_PASSWORD)).startswith(b"t1 OK")
        await client.close()
        await asyncio.sleep(2.5)  # the access token is now dead on the server too
        client = await connect(daemon.address("imap"))
        assert tagged_status(await client.login(mail_user, LOCAL_PASSWORD)).startswith(b"t1 OK")
        await client.close()
    assert len(token_server.authority.requests_for("refresh_token")) >= 2
    stored = harness.store(mail_user).load(mail_user)
    assert stored.refresh_token not in (None, first_rt)  # the rotated one was kept


async def test_fifty_concurrent_logins_with_expired_token_make_one_request(
        harness: ProxyHarness, token_server: TokenServer, mail_user: str) -> None:
    rt = harness.provision(mail_user)
    harness.store(mail_user).save(mail_user, TokenState(
        refresh_token=rt, access_token="expired", expires_at=time.time() - 60))
    token_server.authority.token_delay = 0.5  # all fifty arrive while the request is open
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        clients = await asyncio.gather(*(connect(daemon.address("imap")) for _ in range(50)))
        replies = await asyncio.gather(*(c.login(mail_user, LOCAL_PASSWORD) for c in clients))
        assert all(tagged_status(r).startswith(b"t1 OK") for r in replies)
        await asyncio.gather(*(c.close() for c in clients))
    assert len(token_server.authority.requests_for()) == 1


async def test_server_rejecting_unexpired_token_triggers_one_refresh(
        harness: ProxyHarness, token_server: TokenServer, mail_user: str) -> None:
    harness.provision(mail_user)
    settings = harness.settings(harness.account(mail_user))
    settings.imap.spare_sessions = 0  # the second login logs in upstream, not a spare
    async with harness.run(settings) as daemon:
        client = await connect(daemon.address("imap"))
        assert tagged_status(await client.login(mail_user, LOCAL_PASSWORD)).startswith(b"t1 OK")
        await client.close()
        token_server.authority.invalidate_access_tokens(mail_user)  # revoked server-side
        client = await connect(daemon.address("imap"))
        assert tagged_status(await client.login(mail_user, LOCAL_PASSWORD)).startswith(b"t1 OK")
        await client.close()
    assert len(token_server.authority.requests_for("refresh_token")) == 2


async def test_revoked_refresh_token_says_which_command_to_run(
        harness: ProxyHarness, token_server: TokenServer, mail_user: str) -> None:
    rt = harness.provision(mail_user)
    token_server.authority.revoke_refresh_token(rt)
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        for _ in range(2):
            client = await connect(daemon.address("imap"))
            status = tagged_status(await client.login(mail_user, LOCAL_PASSWORD)).decode()
            assert status.startswith(f"t1 NO [AUTHENTICATIONFAILED] account {mail_user} is not "
                                     "authorized: ")
            assert "invalid_grant" in status
            assert status.endswith(f"run `mailproxy authorize {mail_user}`")
            await client.close()
    # Marked as needing authorization: the second login did not ask the endpoint again.
    assert len(token_server.authority.requests_for()) == 1
    assert harness.store(mail_user).load(mail_user).needs_authorization


async def test_token_endpoint_down_gives_unavailable(
        harness: ProxyHarness, token_server: TokenServer, mail_user: str) -> None:
    harness.provision(mail_user)
    token_server.stop_token_listener()
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await connect(daemon.address("imap"))
        status = tagged_status(await client.login(mail_user, LOCAL_PASSWORD)).decode()
        assert status.startswith(f"t1 NO [UNAVAILABLE] cannot get an access token for "
                                 f"{mail_user}: ")
        assert status.endswith("try again later")
        token_server.start_token_listener()
        # Nothing was marked permanent: once the endpoint is back, the login works.
        assert tagged_status(await client.login(mail_user, LOCAL_PASSWORD)).startswith(b"t2 OK")
        await client.close()


async def test_upstream_down_gives_unavailable(harness: ProxyHarness, dovecot: Dovecot,
                                               mail_user: str) -> None:
    harness.provision(mail_user)
    dovecot.stop()
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await connect(daemon.address("imap"))
        status = tagged_status(await client.login(mail_user, LOCAL_PASSWORD)).decode()
        assert status == (f"t1 NO [UNAVAILABLE] cannot reach {dovecot.host}:"
                          f"{dovecot.imaps_port}: connection refused; try again later")
        dovecot.start()
        assert tagged_status(await client.login(mail_user, LOCAL_PASSWORD)).startswith(b"t2 OK")
        await client.close()


async def test_untrusted_upstream_certificate_is_refused(harness: ProxyHarness,
                                                         mail_user: str) -> None:
    harness.provision(mail_user)
    account = harness.account(mail_user, trust_ca=False)
    async with harness.run(harness.settings(account)) as daemon:
        client = await connect(daemon.address("imap"))
        status = tagged_status(await client.login(mail_user, LOCAL_PASSWORD)).decode()
        assert status.startswith("t1 NO [UNAVAILABLE] cannot reach ")
        assert "TLS certificate not trusted" in status
        await client.close()


async def test_starttls_upstream(harness: ProxyHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    async with harness.run(harness.settings(harness.account(mail_user, tls="starttls"))) as d:
        client = await connect(d.address("imap"))
        assert tagged_status(await client.login(mail_user, LOCAL_PASSWORD)).startswith(b"t1 OK")
        assert tagged_status(await client.command("SELECT INBOX")).startswith(b"t2 OK")
        await client.close()


async def test_one_port_serves_two_accounts_on_different_servers(
        harness: ProxyHarness, mail_user: str) -> None:
    other = "second-" + mail_user
    harness.provision(mail_user)
    harness.provision(other, "other pw")
    settings = harness.settings(harness.account(mail_user),
                                harness.account(other, tls="starttls"))
    async with harness.run(settings) as daemon:
        for user, pw in ((mail_user, LOCAL_PASSWORD), (other, "other pw")):
            client = await connect(daemon.address("imap"))
            assert tagged_status(await client.login(user.upper(), pw)).startswith(b"t1 OK")
            await client.close()


async def test_burst_of_connections_all_get_a_greeting(harness: ProxyHarness) -> None:
    async with harness.run(harness.settings()) as daemon:
        host, port = daemon.address("imap")
        results = await asyncio.gather(*(asyncio.open_connection(host, port)
                                         for _ in range(300)), return_exceptions=True)
        streams = [r for r in results if not isinstance(r, BaseException)]
        assert len(streams) == 300, [r for r in results if isinstance(r, BaseException)][:3]
        greetings = await asyncio.wait_for(
            asyncio.gather(*(reader.readline() for reader, _ in streams)), 20)
        assert all(g.startswith(b"* OK [CAPABILITY") for g in greetings)
        for _, writer in streams:
            writer.close()


async def test_closed_port_and_no_secrets_in_logs(harness: ProxyHarness, mail_user: str,
                                                  token_server: TokenServer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rt = harness.provision(mail_user)
    good = harness.account(mail_user)
    async with harness.run(harness.settings(good)) as daemon:
        client = await connect(daemon.address("imap"))
        await client.login(mail_user, "wrong-password-xyz")
        await client.login(mail_user, LOCAL_PASSWORD)
        await client.command("NOOP")
        await client.close()
    state = harness.store(mail_user).load(mail_user)
    assert state.access_token
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    for secret in (LOCAL_PASSWORD, "wrong-password-xyz", rt, state.access_token,
                   state.refresh_token or "", TEST_CLIENT_SECRET):
        assert secret not in text
    assert f"imap login for {mail_user}" in caplog.text  # logging did happen

    # An account whose server port is closed: the reply says so, the daemon survives.
    closed = harness.account(mail_user, port=free_port())
    async with harness.run(harness.settings(closed)) as daemon:
        client = await connect(daemon.address("imap"))
        status = tagged_status(await client.login(mail_user, LOCAL_PASSWORD))
        assert b"NO [UNAVAILABLE]" in status and b"connection refused" in status
        await client.close()


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
async def test_long_token_with_each_mechanism(harness: ProxyHarness, token_server: TokenServer,
                                              mail_user: str, mechanism: str) -> None:
    token_server.authority.access_token_length = 3000
    harness.provision(mail_user)
    account = harness.account(mail_user, sasl_mechanism=mechanism)
    async with harness.run(harness.settings(account)) as daemon:
        client = await connect(daemon.address("imap"))
        assert tagged_status(await client.login(mail_user, LOCAL_PASSWORD)).startswith(b"t1 OK")
        await client.close()
    stored = harness.store(mail_user).load(mail_user)
    assert stored.access_token is not None and len(stored.access_token) >= 3000


async def test_client_credentials_account(harness: ProxyHarness, token_server: TokenServer,
                                          mail_user: str) -> None:
    app_id = f"app-{mail_user}"
    token_server.authority.register_client(app_id, "app-secret", app_only_user=mail_user)
    Vault(harness.state_dir).create(mail_user, password=LOCAL_PASSWORD)  # no refresh token
    account = harness.account(mail_user, flow="client_credentials").model_copy(
        update={"client_id": app_id, "client_secret": SecretStr("app-secret")})
    async with harness.run(harness.settings(account)) as daemon:
        client = await connect(daemon.address("imap"))
        status = tagged_status(await client.login(mail_user, LOCAL_PASSWORD))
        assert status.startswith(b"t1 OK"), status
        await client.close()
    assert [r[0] for r in token_server.authority.requests_for()] == ["client_credentials"]


async def test_idle_client_before_login_is_dropped_with_bye(harness: ProxyHarness) -> None:
    settings = harness.settings()
    settings.imap.login_timeout = 0.5
    async with harness.run(settings) as daemon:
        client = await connect(daemon.address("imap"))
        async with asyncio.timeout(5):
            assert await client.reader.readline() == \
                b"* BYE Autologout: idle for too long before login\r\n"
            assert await client.reader.read() == b""
        await client.close()


MASTER_KEY = "dGVzdCBtYXN0ZXIga2V5LCAzMiBieXRlcyBvciBzby4u"  # base64 of 32 bytes


async def test_background_refresh_with_master_key_runs_before_any_login(
        harness: ProxyHarness, token_server: TokenServer, mail_user: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILPROXY_TEST_MASTER", MASTER_KEY)
    harness.provision(mail_user, master_key=MASTER_KEY.encode())  # no access token yet
    settings = harness.settings(harness.account(mail_user)).model_copy(
        update={"vault": VaultSettings(master_key="env:MAILPROXY_TEST_MASTER")})
    async with harness.run(settings) as daemon:
        async with asyncio.timeout(10):
            while not token_server.authority.requests_for("refresh_token"):
                await asyncio.sleep(0.05)
        client = await connect(daemon.address("imap"))
        assert tagged_status(await client.login(mail_user, LOCAL_PASSWORD)).startswith(b"t1 OK")
        await client.close()
    # The login found the token the refresher had fetched: no request of its own.
    assert len(token_server.authority.requests_for()) == 1


async def test_without_master_key_refresh_waits_for_the_first_login(
        harness: ProxyHarness, token_server: TokenServer, mail_user: str) -> None:
    harness.provision(mail_user)
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        await asyncio.sleep(1.0)
        assert token_server.authority.requests_for() == []  # locked: nothing can be refreshed
        status = daemon.gate.tokens.status(mail_user)
        assert status["locked"] is True and status["next_refresh"] is None
        client = await connect(daemon.address("imap"))
        assert tagged_status(await client.login(mail_user, LOCAL_PASSWORD)).startswith(b"t1 OK")
        await client.close()
        assert len(token_server.authority.requests_for("refresh_token")) == 1
        # Open now: the background refresher plans the next refresh ahead of expiry.
        status = daemon.gate.tokens.status(mail_user)
        assert status["locked"] is False and status["authorized"] is True
        assert isinstance(status["expires_at"], float)
        assert status["next_refresh"] == pytest.approx(status["expires_at"] - 300, abs=61)


async def test_account_without_imap_server_gets_a_clear_no(harness: ProxyHarness,
                                                           mail_user: str) -> None:
    harness.provision(mail_user)
    pop3_only = harness.account(mail_user).model_copy(update={"imap_server": None})
    async with harness.run(harness.settings(pop3_only)) as daemon:
        client = await connect(daemon.address("imap"))
        status = tagged_status(await client.login(mail_user, LOCAL_PASSWORD)).decode()
        assert status == (f"t1 NO [CANNOT] account {mail_user} has no imap_server configured; "
                          "add one to use it over IMAP")
        await client.close()
