"""The POP3 proxy end to end: real clients -> proxy -> real Dovecot POP3 (oauth2 passdb)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import poplib
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from proxy.tokens.store import TokenState
from tests.support.dovecot import Dovecot
from tests.support.proxyrun import LOCAL_PASSWORD, ProxyHarness
from tests.support.tokenserver import TEST_CLIENT_SECRET, TokenServer

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: Bob <bob@example.test>\r\n"
           b"Subject: pop test\r\nMessage-ID: <p1@example.test>\r\n\r\n"
           b"line one\r\n.leading dot needs stuffing\r\n..two dots\r\nlast line\r\n")


def big_message(size: int) -> bytes:
    head = b"From: big@example.test\r\nSubject: big\r\nMessage-ID: <big@example.test>\r\n\r\n"
    body = bytearray()
    n = 0
    while len(body) < size:
        # Every seventh line starts with a dot: the server stuffs it, the proxy must not care.
        lead = b"." if n % 7 == 0 else b""
        body += lead + b"%08d " % n + b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"\r\n"
        n += 1
    return head + bytes(body)


class RawPop3:
    """A raw POP3 client: exact bytes of single-line and multi-line answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.greeting = b""

    @classmethod
    async def connect(cls, host: str, port: int, *, ca_file: Path | None = None) -> RawPop3:
        context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(host, port, ssl=context,
                                                           limit=64 << 20)
            client = cls(reader, writer)
            client.greeting = await reader.readline()
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def line(self) -> bytes:
        async with asyncio.timeout(30):
            return await self.reader.readline()

    async def multi(self) -> bytes:
        """A status line and, if it is +OK, the lines up to the terminating dot."""
        first = await self.line()
        if not first.startswith(b"+OK"):
            return first
        async with asyncio.timeout(60):
            return first + await self.reader.readuntil(b"\r\n.\r\n")

    async def command(self, text: str | bytes, multi: bool = False) -> bytes:
        await self.send((text.encode() if isinstance(text, str) else text) + b"\r\n")
        return await (self.multi() if multi else self.line())

    async def login(self, user: str, password: str) -> bytes:
        assert (await self.command(f"USER {user}")).startswith(b"+OK")
        return await self.command(f"PASS {password}")

    async def xoauth2(self, user: str, token: str) -> bytes:
        assert await self.command("AUTH XOAUTH2") == b"+ \r\n"
        raw = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
        return await self.command(base64.b64encode(raw))

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


@pytest.fixture
def harness(tmp_path: Path, token_server: TokenServer, dovecot: Dovecot) -> ProxyHarness:
    return ProxyHarness(tmp_path / "state", token_server, dovecot)


async def test_user_pass_then_transaction_commands(harness: ProxyHarness, dovecot: Dovecot,
                                                   mail_user: str) -> None:
    harness.provision(mail_user)
    dovecot.deliver(mail_user, MESSAGE)
    dovecot.deliver(mail_user, MESSAGE.replace(b"p1@", b"p2@"))
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await RawPop3.connect(*daemon.address("pop3"))
        assert client.greeting == b"+OK mailproxy ready\r\n"
        capa = await client.command("CAPA", multi=True)
        assert b"\r\nSTLS\r\nUSER\r\nSASL PLAIN\r\n" in capa  # STLS: local TLS offered
        assert await client.login(mail_user, LOCAL_PASSWORD) == b"+OK Logged in\r\n"
        # From here on Dovecot answers.
        after = await client.command("CAPA", multi=True)
        assert b"\r\nUIDL\r\n" in after and b"\r\nTOP\r\n" in after and after != capa
        stat = await client.command("STAT")
        assert stat == b"+OK 2 %d\r\n" % (2 * len(MESSAGE))
        listing = await client.command("LIST", multi=True)
        assert listing.endswith(b"1 %d\r\n2 %d\r\n.\r\n" % (len(MESSAGE), len(MESSAGE)))
        uidl = await client.command("UIDL", multi=True)
        assert uidl.count(b"\r\n") == 4
        retr = await client.command("RETR 1", multi=True)
        stuffed = MESSAGE.replace(b"\r\n.", b"\r\n..")
        assert retr == b"+OK %d octets\r\n" % len(MESSAGE) + stuffed + b".\r\n"
        top = await client.command("TOP 2 1", multi=True)
        assert b"Message-ID: <p2@example.test>\r\n\r\nline one\r\n.\r\n" in top
        assert b"leading dot" not in top
        assert (await client.command("DELE 1")).startswith(b"+OK")
        assert (await client.command("QUIT")).startswith(b"+OK")
        assert await client.reader.read() == b""
        await client.close()

        client = await RawPop3.connect(*daemon.address("pop3"))
        await client.login(mail_user, LOCAL_PASSWORD)
        assert await client.command("STAT") == b"+OK 1 %d\r\n" % len(MESSAGE)
        await client.close()


@pytest.mark.parametrize("initial_response", [True, False])
async def test_auth_plain(harness: ProxyHarness, mail_user: str, initial_response: bool) -> None:
    harness.provision(mail_user)
    creds = base64.b64encode(f"\0{mail_user}\0{LOCAL_PASSWORD}".encode())
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await RawPop3.connect(*daemon.address("pop3"))
        assert await client.command("AUTH", multi=True) == \
            b"+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n"
        if initial_response:
            reply = await client.command(b"AUTH PLAIN " + creds)
        else:
            assert await client.command("AUTH PLAIN") == b"+ \r\n"
            reply = await client.command(creds)
        assert reply == b"+OK Logged in\r\n"
        assert await client.command("STAT") == b"+OK 0 0\r\n"
        await client.close()


async def test_pipelined_commands_reach_the_server_after_login(harness: ProxyHarness,
                                                               dovecot: Dovecot,
                                                               mail_user: str) -> None:
    harness.provision(mail_user)
    dovecot.deliver(mail_user, MESSAGE)
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await RawPop3.connect(*daemon.address("pop3"))
        await client.send(f"USER {mail_user}\r\nPASS {LOCAL_PASSWORD}\r\nSTAT\r\nLIST 1\r\n"
                          .encode())
        assert await client.line() == b"+OK Send PASS\r\n"
        assert await client.line() == b"+OK Logged in\r\n"
        assert await client.line() == b"+OK 1 %d\r\n" % len(MESSAGE)
        assert await client.line() == b"+OK 1 %d\r\n" % len(MESSAGE)
        await client.close()


async def test_ten_megabytes_retrieved_byte_identical_to_direct(
        harness: ProxyHarness, dovecot: Dovecot, token_server: TokenServer,
        mail_user: str) -> None:
    harness.provision(mail_user)
    message = big_message(10 * 1024 * 1024)
    dovecot.deliver(mail_user, message)

    direct = await RawPop3.connect(dovecot.host, dovecot.pop3s_port, ca_file=dovecot.ca_file)
    token = token_server.authority.issue_access_token(mail_user)
    assert (await direct.xoauth2(mail_user, token)).startswith(b"+OK")
    expected = await direct.command("RETR 1", multi=True)
    await direct.close()
    assert expected.startswith(b"+OK %d octets\r\n" % len(message))
    assert len(expected) > len(message)  # dot-stuffed

    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await RawPop3.connect(*daemon.address("pop3"))
        await client.login(mail_user, LOCAL_PASSWORD)
        through_proxy = await client.command("RETR 1", multi=True)
        assert (await client.command("QUIT")).startswith(b"+OK")
        await client.close()
    assert through_proxy == expected


async def test_poplib_client(harness: ProxyHarness, dovecot: Dovecot, mail_user: str) -> None:
    harness.provision(mail_user)
    dovecot.deliver(mail_user, MESSAGE)
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        host, port = daemon.address("pop3")

        def fetch() -> list[bytes]:
            pop = poplib.POP3(host, port, timeout=20)
            try:
                assert "SASL" in pop.capa()
                pop.user(mail_user)
                pop.pass_(LOCAL_PASSWORD)
                assert pop.stat() == (1, len(MESSAGE))
                _, lines, _ = pop.retr(1)
                pop.dele(1)
            finally:
                pop.quit()
            return lines

        lines = await asyncio.to_thread(fetch)
    assert b"\r\n".join(lines) + b"\r\n" == MESSAGE
    assert not list(dovecot.maildir(mail_user).glob("cur/*"))  # DELE + QUIT reached Dovecot
    assert not list(dovecot.maildir(mail_user).glob("new/*"))


async def test_starttls_upstream_and_oauthbearer(harness: ProxyHarness,
                                                 token_server: TokenServer,
                                                 mail_user: str) -> None:
    token_server.authority.access_token_length = 3000  # far over the 255-octet line limit
    harness.provision(mail_user)
    for mechanism in ("xoauth2", "oauthbearer"):
        account = harness.account(mail_user, pop3_tls="starttls", sasl_mechanism=mechanism)
        async with harness.run(harness.settings(account)) as daemon:
            client = await RawPop3.connect(*daemon.address("pop3"))
            assert await client.login(mail_user, LOCAL_PASSWORD) == b"+OK Logged in\r\n"
            assert await client.command("STAT") == b"+OK 0 0\r\n"
            await client.close()


async def test_dovecot_failure_challenge_as_the_core_expects(dovecot: Dovecot) -> None:
    """What a refused token looks like on Dovecot POP3: a `+ <base64 JSON>` challenge first."""
    client = await RawPop3.connect(dovecot.host, dovecot.pop3s_port, ca_file=dovecot.ca_file)
    assert await client.command("AUTH XOAUTH2") == b"+ \r\n"
    raw = base64.b64encode(b"user=nobody@example.test\x01auth=Bearer nope\x01\x01")
    challenge = await client.command(raw)
    assert challenge.startswith(b"+ ")
    info = json.loads(base64.b64decode(challenge[2:].strip()))
    assert info["status"] in ("400", "401") and "schemes" in info
    assert await client.command(b"") == b"-ERR [AUTH] Authentication failed.\r\n"
    await client.close()


async def test_wrong_local_password(harness: ProxyHarness, token_server: TokenServer,
                                    mail_user: str) -> None:
    harness.provision(mail_user)
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await RawPop3.connect(*daemon.address("pop3"))
        assert await client.login(mail_user, "wrong password") == \
            b"-ERR [AUTH] Invalid credentials\r\n"
        assert await client.login("nobody@example.test", LOCAL_PASSWORD) == \
            b"-ERR [AUTH] Invalid credentials\r\n"
        assert await client.command("STAT") == (
            b"-ERR STAT is not accepted before login; log in first "
            b"(accepted now: CAPA, USER, PASS, AUTH PLAIN and QUIT)\r\n")
        assert await client.login(mail_user, LOCAL_PASSWORD) == b"+OK Logged in\r\n"
        await client.close()
    assert len(token_server.authority.requests_for()) == 1  # only the good login asked


async def test_expired_access_token_is_refreshed(harness: ProxyHarness,
                                                 token_server: TokenServer,
                                                 mail_user: str) -> None:
    rt = harness.provision(mail_user)
    harness.store(mail_user).save(mail_user, TokenState(
        refresh_token=rt, access_token="expired", expires_at=time.time() - 60))
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await RawPop3.connect(*daemon.address("pop3"))
        assert await client.login(mail_user, LOCAL_PASSWORD) == b"+OK Logged in\r\n"
        await client.close()
    assert len(token_server.authority.requests_for("refresh_token")) == 1
    assert harness.store(mail_user).load(mail_user).access_token != "expired"


async def test_token_revoked_on_the_server_is_refreshed_once(harness: ProxyHarness,
                                                             token_server: TokenServer,
                                                             mail_user: str) -> None:
    harness.provision(mail_user)
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await RawPop3.connect(*daemon.address("pop3"))
        assert await client.login(mail_user, LOCAL_PASSWORD) == b"+OK Logged in\r\n"
        await client.close()
        token_server.authority.invalidate_access_tokens(mail_user)
        # Dovecot refuses the cached token (failure challenge answered), the proxy refreshes
        # and retries on the same connection.
        client = await RawPop3.connect(*daemon.address("pop3"))
        assert await client.login(mail_user, LOCAL_PASSWORD) == b"+OK Logged in\r\n"
        await client.close()
    assert len(token_server.authority.requests_for("refresh_token")) == 2


async def test_revoked_refresh_token_says_which_command_to_run(
        harness: ProxyHarness, token_server: TokenServer, mail_user: str) -> None:
    rt = harness.provision(mail_user)
    token_server.authority.revoke_refresh_token(rt)
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await RawPop3.connect(*daemon.address("pop3"))
        reply = (await client.login(mail_user, LOCAL_PASSWORD)).decode()
        assert reply.startswith(f"-ERR [AUTH] account {mail_user} is not authorized: ")
        assert "invalid_grant" in reply
        assert reply.endswith(f"run `mailproxy authorize {mail_user}`\r\n")
        await client.close()


async def test_temporary_failures_give_sys_temp(harness: ProxyHarness, dovecot: Dovecot,
                                                token_server: TokenServer,
                                                mail_user: str) -> None:
    harness.provision(mail_user)
    token_server.stop_token_listener()
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await RawPop3.connect(*daemon.address("pop3"))
        reply = (await client.login(mail_user, LOCAL_PASSWORD)).decode()
        assert reply.startswith(f"-ERR [SYS/TEMP] cannot get an access token for {mail_user}: ")
        token_server.start_token_listener()
        dovecot.stop()
        reply = (await client.login(mail_user, LOCAL_PASSWORD)).decode()
        assert reply == (f"-ERR [SYS/TEMP] cannot reach {dovecot.host}:{dovecot.pop3s_port}: "
                         "connection refused; try again later\r\n")
        dovecot.start()
        assert await client.login(mail_user, LOCAL_PASSWORD) == b"+OK Logged in\r\n"
        await client.close()


async def test_idle_client_before_login_is_dropped(harness: ProxyHarness) -> None:
    settings = harness.settings()
    settings.pop3.login_timeout = 0.5
    async with harness.run(settings) as daemon:
        client = await RawPop3.connect(*daemon.address("pop3"))
        async with asyncio.timeout(5):
            assert await client.reader.readline() == \
                b"-ERR Disconnected: idle for too long before login\r\n"
            assert await client.reader.read() == b""
        await client.close()


async def test_no_secrets_in_logs(harness: ProxyHarness, mail_user: str,
                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rt = harness.provision(mail_user)
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        client = await RawPop3.connect(*daemon.address("pop3"))
        await client.login(mail_user, "wrong-password-xyz")
        await client.login(mail_user, LOCAL_PASSWORD)
        await client.command("STAT")
        await client.close()
    state = harness.store(mail_user).load(mail_user)
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    for secret in (LOCAL_PASSWORD, "wrong-password-xyz", rt, state.access_token or "",
                   TEST_CLIENT_SECRET):
        assert secret not in text
    assert f"pop3 login for {mail_user}" in caplog.text


def _require_fetchmail() -> str:
    path = shutil.which("fetchmail")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("fetchmail is not installed (CI is set: .ci/run installs it)")
        pytest.skip("fetchmail is not installed (apt-get install fetchmail)")
    return path


async def test_fetchmail_through_the_proxy(harness: ProxyHarness, dovecot: Dovecot,
                                           tmp_path: Path, mail_user: str) -> None:
    fetchmail = _require_fetchmail()
    password = "fetchmail local pw"  # plain enough for the rc file's quoting rules
    harness.provision(mail_user, password)
    messages = [MESSAGE.replace(b"p1@", b"f%d@" % i) for i in range(3)]
    for message in messages:
        dovecot.deliver(mail_user, message)
    home = tmp_path / "fetchmail-home"
    home.mkdir(mode=0o700)
    out = tmp_path / "delivered"
    out.mkdir()
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        host, port = daemon.address("pop3")
        rcfile = home / "fetchmailrc"
        rcfile.write_text(
            f'poll {host} service {port} protocol POP3 auth password\n'
            f'  user "{mail_user}" password "{password}"\n'
            f'  sslproto "" nokeep fetchall\n'
            f'  mda "/bin/sh -c \'cat > {out}/msg.$$\'"\n')
        rcfile.chmod(0o600)
        proc = await asyncio.create_subprocess_exec(
            fetchmail, "-f", str(rcfile), "--nodetach", "-v",
            env={**os.environ, "FETCHMAILHOME": str(home), "HOME": str(home)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
    log = output.decode(errors="replace")
    assert proc.returncode == 0, log
    assert password not in log
    # fetchmail adds its own Received: header and delivers with LF line ends.
    delivered = sorted(p.read_bytes() for p in out.iterdir())
    assert len(delivered) == 3, log
    for message in messages:
        body = message.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")
        assert any(d.endswith(body) for d in delivered), log
    assert not list(dovecot.maildir(mail_user).glob("new/*"))  # nokeep: deleted upstream
    assert not list(dovecot.maildir(mail_user).glob("cur/*"))


async def test_custom_account_without_pop3_server(harness: ProxyHarness,
                                                  mail_user: str) -> None:
    harness.provision(mail_user)
    account = harness.account(mail_user).model_copy(update={"pop3_server": None,
                                                           "pop3_tls": None})
    async with harness.run(harness.settings(account)) as daemon:
        client = await RawPop3.connect(*daemon.address("pop3"))
        assert await client.login(mail_user, LOCAL_PASSWORD) == (
            f"-ERR [SYS/PERM] account {mail_user} has no pop3_server configured; add one to "
            "use it over POP3\r\n").encode()
        await client.close()
