"""The SMTP proxy end to end: aiosmtplib / smtplib -> proxy -> real Postfix (Dovecot SASL with
XOAUTH2/OAUTHBEARER) -> LMTP -> Dovecot mailboxes, read back from the maildirs."""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import re
import smtplib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from proxy.config import Account, Settings
from tests.support.cutter import Cutter
from tests.support.dovecot import Dovecot
from tests.support.postfix import (
    DEFER_DATA_SENDER,
    MESSAGE_SIZE_LIMIT,
    REFUSE_DATA_SENDER,
    Postfix,
)
from tests.support.proxyrun import LOCAL_PASSWORD, ProxyHarness
from tests.support.tokenserver import TokenServer


class SmtpHarness(ProxyHarness):
    postfix: Postfix

    def smtp_account(self, address: str, *, smtp_tls: str = "implicit",
                     smtp_port: int | None = None, **extra: Any) -> Account:
        if smtp_port is None:
            smtp_port = self.postfix.smtps_port if smtp_tls == "implicit" \
                else self.postfix.smtp_port
        return self.account(address, smtp_server=f"{self.postfix.host}:{smtp_port}",
                            smtp_tls=smtp_tls, **extra)

    def smtp_settings(self, address: str, **extra: Any) -> Settings:
        return self.settings(self.smtp_account(address, **extra))


@pytest.fixture
def harness(tmp_path: Path, token_server: TokenServer, dovecot: Dovecot,
            postfix: Postfix) -> SmtpHarness:
    postfix.ensure_running()
    h = SmtpHarness(tmp_path / "state", token_server, dovecot)
    h.postfix = postfix
    return h


@pytest.fixture
async def cutter(postfix: Postfix) -> AsyncIterator[Cutter]:
    c = Cutter(postfix.host, postfix.smtps_port)
    await c.start()
    try:
        yield c
    finally:
        await c.close()


def message(sender: str, to: str, body: bytes, subject: str = "test") -> bytes:
    """A message with CRLF line ends and the headers Postfix would otherwise add."""
    stamp = f"{time.time_ns()}"
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: Sat, 21 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{stamp}@example.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n")
    return head.encode() + body


def delivered(dovecot: Dovecot, user: str) -> list[bytes]:
    maildir = dovecot.maildir(user)
    files = sorted(p for sub in ("new", "cur") if (maildir / sub).is_dir()
                   for p in (maildir / sub).iterdir())
    return [p.read_bytes() for p in files]


async def wait_delivered(dovecot: Dovecot, user: str, count: int = 1,
                         timeout: float = 30.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while True:
        found = delivered(dovecot, user)
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) == count, f"{len(found)} messages delivered to {user}, not {count}"
            return found
        await asyncio.sleep(0.1)


def same_message(stored: bytes, sent: bytes) -> bool:
    # Dovecot stores LF line ends and LMTP adds Return-Path/Delivered-To/Received on top.
    return stored.replace(b"\r\n", b"\n").endswith(sent.replace(b"\r\n", b"\n"))


async def smtp_client(address: tuple[str, int]) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname=address[0], port=address[1], use_tls=False,
                             start_tls=False, timeout=60)
    await client.connect()
    return client


class Raw:
    """Exact SMTP lines, for the local dialogue."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, address: tuple[str, int]) -> Raw:
        raw = cls(*await asyncio.open_connection(*address))
        assert (await raw.reply()).startswith("220 ")
        return raw

    async def reply(self) -> str:
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 30)).decode()
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                return "\n".join(lines)

    async def cmd(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# ----------------------------------------------------------------------------- dialogue


async def test_local_dialogue(harness: SmtpHarness, mail_user: str,
                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    harness.provision(mail_user)
    async with harness.run(harness.smtp_settings(mail_user)) as daemon:
        addr = daemon.address("smtp")
        raw = await Raw.connect(addr)
        assert (await raw.cmd("AUTH PLAIN")).startswith("503 5.5.1")  # before EHLO
        ehlo = await raw.cmd("EHLO client.example")
        lines = ehlo.splitlines()
        assert all(x.startswith("250-") for x in lines[:-1]) and lines[-1].startswith("250 ")
        caps = {x[4:].split(" ")[0]: x[4:] for x in lines[1:]}
        assert caps["AUTH"].split()[1:] == ["LOGIN", "PLAIN"]
        assert {"SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"} <= caps.keys()
        assert "NTLM" not in ehlo and "GSSAPI" not in ehlo
        assert (await raw.cmd("MAIL FROM:<a@example.test>")).startswith("530 5.7.0")
        assert (await raw.cmd("RCPT TO:<b@example.test>")).startswith("530 5.7.0")
        assert (await raw.cmd("AUTH NTLM")).startswith("504 5.5.4")
        assert await raw.cmd("AUTH PLAIN") == "334 "
        assert (await raw.cmd("*")).startswith("501 ")
        assert (await raw.cmd(f"AUTH PLAIN {plain(mail_user, 'wrong')}")).startswith(
            "535 5.7.8")
        assert await raw.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
        assert await raw.cmd(base64.b64encode(mail_user.encode()).decode()) == \
            "334 UGFzc3dvcmQ6"
        assert (await raw.cmd("*")).startswith("501 ")
        assert (await raw.cmd(f"AUTH plain {plain(mail_user, LOCAL_PASSWORD)}")).startswith(
            "235 2.7.0")
        assert (await raw.cmd(f"AUTH PLAIN {plain(mail_user, LOCAL_PASSWORD)}")).startswith(
            "503 5.5.1")
        assert (await raw.cmd("NOOP")).startswith("250 2.0.0")
        # EHLO ends a transaction, here and upstream: a new MAIL is not a nested one.
        assert (await raw.cmd(f"MAIL FROM:<{mail_user}>")).startswith("250 2.1.0")
        assert (await raw.cmd("EHLO client.example")).startswith("250-")
        assert (await raw.cmd(f"MAIL FROM:<{mail_user}>")).startswith("250 2.1.0")
        assert (await raw.cmd("RSET")).startswith("250 2.0.0")
        ehlo = await raw.cmd("EHLO client.example")
        assert f"250-SIZE {MESSAGE_SIZE_LIMIT}" in ehlo  # the upstream's limit, once known
        assert (await raw.cmd("QUIT")).startswith("221 2.0.0")
        await raw.close()

        helo = await Raw.connect(addr)
        assert (await helo.cmd("HELO old.client")).startswith("250 ")
        assert (await helo.cmd("AUTH PLAIN")).startswith("503 5.5.1")
        assert (await helo.cmd("MAIL FROM:<a@example.test>")).startswith("530 5.7.0")
        await helo.close()
    # No password, PLAIN blob or token in any log line (aiosmtpd's included).
    for secret in (LOCAL_PASSWORD, plain(mail_user, LOCAL_PASSWORD), "Bearer", "at_"):
        assert secret not in caplog.text
    # aiosmtpd warned about its own deprecated Session.login_data at every good login.
    assert "deprecated" not in caplog.text


async def test_idle_timeout(harness: SmtpHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    settings = harness.smtp_settings(mail_user)
    settings.smtp.idle_timeout = 0.5
    async with harness.run(settings) as daemon:
        raw = await Raw.connect(daemon.address("smtp"))
        await raw.cmd("EHLO c")
        assert (await raw.reply()).startswith("421 4.4.2")
        assert await raw.reader.read() == b""
        await raw.close()


# ------------------------------------------------------------------------------ relay


BODY = ("Grüße, 日本語 and 8-bit text.\r\n"
        ".a line starting with a dot\r\n..two dots\r\n.\r\n. \r\n"
        "last line\r\n").encode()


async def test_aiosmtplib_plain_dots_and_utf8(harness: SmtpHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    async with harness.run(harness.smtp_settings(mail_user)) as daemon:
        client = await smtp_client(daemon.address("smtp"))
        await client.ehlo()
        await client.auth_plain(mail_user, LOCAL_PASSWORD)
        sent = message(mail_user, mail_user, BODY, "dots")
        errors, reply = await client.sendmail(mail_user, [mail_user], sent)
        assert errors == {} and reply.startswith("2.0.0 Ok: queued as")
        # SMTPUTF8 and a UTF-8 address part: passed through to Postfix.
        sent2 = message(mail_user, mail_user, "Ümlaut body\r\n".encode(), "utf8")
        errors, _ = await client.sendmail(mail_user, [mail_user], sent2,
                                          mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        assert errors == {}
        await client.quit()
    stored = await wait_delivered(harness.dovecot, mail_user, 2)
    assert sum(same_message(s, sent) for s in stored) == 1
    assert sum(same_message(s, sent2) for s in stored) == 1


async def test_smtplib_login_starttls_upstream_several_messages(
        harness: SmtpHarness, mail_user: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailproxy.smtp")
    password = "ascii password"  # smtplib encodes AUTH LOGIN and PLAIN as ASCII
    harness.provision(mail_user, password)
    settings = harness.smtp_settings(mail_user, smtp_tls="starttls")
    async with harness.run(settings) as daemon:
        host, port = daemon.address("smtp")
        sent = [message(mail_user, mail_user, f"message {i}\r\n".encode(), f"n{i}")
                for i in range(4)]

        def session() -> None:
            with smtplib.SMTP(host, port, timeout=60) as s:
                s.ehlo()
                s.user, s.password = mail_user, password
                s.auth("LOGIN", s.auth_login)  # smtplib's own AUTH LOGIN dialogue
                s.sendmail(mail_user, [mail_user], sent[0])
                assert s.rset()[0] == 250
                assert s.noop()[0] == 250
                s.sendmail(mail_user, [mail_user], sent[1])
                s.sendmail(mail_user, [mail_user], sent[2])

        def login() -> None:  # smtplib.login picks AUTH PLAIN from what we offer
            with smtplib.SMTP(host, port, timeout=60) as s:
                s.login(mail_user, password)
                s.sendmail(mail_user, [mail_user], sent[3])

        await asyncio.to_thread(session)
        await asyncio.to_thread(login)
    stored = await wait_delivered(harness.dovecot, mail_user, 4)
    for m in sent:
        assert sum(same_message(s, m) for s in stored) == 1
    # One line per message relayed, with the upstream's verdict.
    lines = [r.getMessage() for r in caplog.records if r.name == "mailproxy.smtp"
             and f"{mail_user} -> 1 recipient(s) via" in r.getMessage()]
    assert len(lines) == 4 and all(": 250 2.0.0 Ok: queued as " in line for line in lines)


async def test_20_mb_message(harness: SmtpHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    line = (b"0123456789abcdefghijklmnopqrstuvwxyz" * 2)[:76] + b"\r\n"
    sent = message(mail_user, mail_user, line * (20 * 1024 * 1024 // len(line)), "big")
    assert len(sent) > 20_000_000
    async with harness.run(harness.smtp_settings(mail_user)) as daemon:
        client = await smtp_client(daemon.address("smtp"))
        await client.login(mail_user, LOCAL_PASSWORD)
        errors, _ = await client.sendmail(mail_user, [mail_user], sent, timeout=120)
        assert errors == {}
        await client.quit()
    (stored,) = await wait_delivered(harness.dovecot, mail_user, 1, timeout=60)
    assert same_message(stored, sent)


async def test_size_limit_from_config(harness: SmtpHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    settings = harness.smtp_settings(mail_user)
    settings.smtp.max_message_size = 10_000
    async with harness.run(settings) as daemon:
        raw = await Raw.connect(daemon.address("smtp"))
        assert "250-SIZE 10000" in await raw.cmd("EHLO c")
        assert (await raw.cmd(f"AUTH PLAIN {plain(mail_user, LOCAL_PASSWORD)}"))[:3] == "235"
        assert (await raw.cmd(f"MAIL FROM:<{mail_user}> SIZE=20000")).startswith("552 5.3.4")
        assert (await raw.cmd(f"MAIL FROM:<{mail_user}>")).startswith("250 ")
        assert (await raw.cmd(f"RCPT TO:<{mail_user}>")).startswith("250 ")
        assert (await raw.cmd("DATA")).startswith("354")
        raw.writer.write((b"y" * 70 + b"\r\n") * 200)
        assert (await raw.cmd(".")).startswith("552 5.3.4")
        await raw.close()


async def test_50_recipients_one_unknown(harness: SmtpHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    users = [f"{mail_user[:-len('@example.test')][:-2]}{i:02x}@example.test"
             for i in range(49)]
    users.insert(17, "nobody@example.test")
    sent = message(mail_user, "undisclosed-recipients:;", b"to fifty\r\n", "fifty")
    async with harness.run(harness.smtp_settings(mail_user)) as daemon:
        client = await smtp_client(daemon.address("smtp"))
        await client.login(mail_user, LOCAL_PASSWORD)
        await client.mail(mail_user)
        refused = {}
        for user in users:
            try:
                await client.rcpt(user)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused[user] = (exc.code, exc.message)
        assert list(refused) == ["nobody@example.test"]
        code, text = refused["nobody@example.test"]
        assert code == 550 and text.startswith("5.1.1 <nobody@example.test>: Recipient address "
                                               "rejected")  # Postfix's own words, at RCPT
        assert (await client.data(sent)).code == 250
        await client.quit()
    for user in users:
        if user != "nobody@example.test":
            (stored,) = await wait_delivered(harness.dovecot, user, 1)
            assert same_message(stored, sent)


async def test_recipient_cap(harness: SmtpHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    async with harness.run(harness.smtp_settings(mail_user, smtp_max_recipients=2)) as daemon:
        client = await smtp_client(daemon.address("smtp"))
        await client.login(mail_user, LOCAL_PASSWORD)
        await client.mail(mail_user)
        await client.rcpt(mail_user)
        await client.rcpt(mail_user)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as info:
            await client.rcpt(mail_user)
        assert info.value.code == 452 and info.value.message.startswith("4.5.3")
        await client.quit()


# --------------------------------------------------------------- connection failures


async def test_upstream_killed_during_data(harness: SmtpHarness, mail_user: str,
                                           cutter: Cutter) -> None:
    harness.provision(mail_user)
    sent = message(mail_user, mail_user, (b"z" * 998 + b"\r\n") * 2000, "cut")
    settings = harness.smtp_settings(mail_user, smtp_port=cutter.port)
    before = lost_after_data(harness.postfix)  # earlier tests' drops are in the log too
    async with harness.run(settings) as daemon:
        client = await smtp_client(daemon.address("smtp"))
        await client.login(mail_user, LOCAL_PASSWORD)
        await client.mail(mail_user)
        await client.rcpt(mail_user)
        cutter.cut_after(len(sent) // 2)  # Postfix gets half of the message, never its end
        with pytest.raises(aiosmtplib.SMTPDataError) as info:
            await client.data(sent)
        assert 400 <= info.value.code < 500 and info.value.message.startswith("4.4.2")
        await wait_lost_after_data(harness.postfix, before)
        assert delivered(harness.dovecot, mail_user) == []
        # The client retries in the same session: a new upstream connection, delivered once.
        await client.rset()
        errors, _ = await client.sendmail(mail_user, [mail_user], sent)
        assert errors == {}
        await client.quit()
    (stored,) = await wait_delivered(harness.dovecot, mail_user, 1)
    assert same_message(stored, sent)
    assert cutter.connections == 2


async def test_upstream_killed_after_rcpt(harness: SmtpHarness, mail_user: str,
                                          cutter: Cutter) -> None:
    harness.provision(mail_user)
    sent = message(mail_user, mail_user, b"short\r\n", "cut early")
    settings = harness.smtp_settings(mail_user, smtp_port=cutter.port)
    async with harness.run(settings) as daemon:
        client = await smtp_client(daemon.address("smtp"))
        await client.login(mail_user, LOCAL_PASSWORD)
        await client.mail(mail_user)
        await client.rcpt(mail_user)
        cutter.cut()
        await asyncio.sleep(0.2)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as rcpt:
            await client.rcpt(mail_user)
        assert rcpt.value.code == 451
        with pytest.raises(aiosmtplib.SMTPDataError) as info:
            await client.data(sent)
        assert info.value.code == 451
        await client.quit()
    await asyncio.sleep(1)
    assert delivered(harness.dovecot, mail_user) == []


async def test_reconnect_between_messages_with_expired_token(
        harness: SmtpHarness, mail_user: str, cutter: Cutter,
        token_server: TokenServer) -> None:
    harness.provision(mail_user)
    settings = harness.smtp_settings(mail_user, smtp_port=cutter.port)
    first = message(mail_user, mail_user, b"first\r\n", "1")
    second = message(mail_user, mail_user, b"second\r\n", "2")
    async with harness.run(settings) as daemon:
        client = await smtp_client(daemon.address("smtp"))
        await client.login(mail_user, LOCAL_PASSWORD)
        assert (await client.sendmail(mail_user, [mail_user], first))[0] == {}
        # Mid-session the access token dies and the upstream drops the idle connection.
        assert token_server.authority.invalidate_access_tokens(mail_user) >= 1
        token_server.authority.reset_log()
        cutter.cut()
        await asyncio.sleep(0.2)
        assert (await client.sendmail(mail_user, [mail_user], second))[0] == {}
        await client.quit()
    assert [r[0] for r in token_server.authority.requests_for()] == ["refresh_token"]
    assert cutter.connections == 2
    stored = await wait_delivered(harness.dovecot, mail_user, 2)
    assert any(same_message(s, second) for s in stored)


# ----------------------------------------------------------------------------- tokens


async def test_revoked_refresh_token(harness: SmtpHarness, mail_user: str,
                                     token_server: TokenServer) -> None:
    refresh_token = harness.provision(mail_user)
    token_server.authority.revoke_refresh_token(refresh_token)
    async with harness.run(harness.smtp_settings(mail_user)) as daemon:
        raw = await Raw.connect(daemon.address("smtp"))
        await raw.cmd("EHLO c")
        reply = await raw.cmd(f"AUTH PLAIN {plain(mail_user, LOCAL_PASSWORD)}")
        assert reply.startswith("535 5.7.8") and f"mailproxy authorize {mail_user}" in reply
        await raw.close()


async def test_token_endpoint_down_gives_454(harness: SmtpHarness, mail_user: str,
                                             token_server: TokenServer) -> None:
    harness.provision(mail_user)
    token_server.stop_token_listener()
    async with harness.run(harness.smtp_settings(mail_user)) as daemon:
        raw = await Raw.connect(daemon.address("smtp"))
        await raw.cmd("EHLO c")
        reply = await raw.cmd(f"AUTH PLAIN {plain(mail_user, LOCAL_PASSWORD)}")
        assert reply.startswith("454 4.7.0")
        await raw.close()


async def test_upstream_down_gives_454(harness: SmtpHarness, mail_user: str,
                                       cutter: Cutter) -> None:
    harness.provision(mail_user)
    await cutter.close()  # nothing listens on its port any more
    async with harness.run(harness.smtp_settings(mail_user, smtp_port=cutter.port)) as daemon:
        raw = await Raw.connect(daemon.address("smtp"))
        await raw.cmd("EHLO c")
        reply = await raw.cmd(f"AUTH PLAIN {plain(mail_user, LOCAL_PASSWORD)}")
        assert reply.startswith("454 4.7.0") and "connection refused" in reply
        await raw.close()


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
async def test_3kb_access_token(harness: SmtpHarness, mail_user: str,
                                token_server: TokenServer, mechanism: str) -> None:
    harness.provision(mail_user)
    token_server.authority.access_token_length = 3072
    sent = message(mail_user, mail_user, b"long token\r\n", mechanism)
    settings = harness.smtp_settings(mail_user, sasl_mechanism=mechanism)
    async with harness.run(settings) as daemon:
        client = await smtp_client(daemon.address("smtp"))
        await client.login(mail_user, LOCAL_PASSWORD)
        assert (await client.sendmail(mail_user, [mail_user], sent))[0] == {}
        await client.quit()
    assert any(len(t) == 3072 and ok
               for t, ok in token_server.authority.introspection_requests)
    (stored,) = await wait_delivered(harness.dovecot, mail_user, 1)
    assert same_message(stored, sent)
    log = harness.postfix.log_text()
    assert f"sasl_method={mechanism.upper()}, sasl_username={mail_user}" in log


# ------------------------------------------------------------------- streamed DATA


def stuff(content: bytes) -> bytes:
    """What a client sends after DATA for ``content`` (CRLF lines): dots doubled, end added."""
    wire = content.replace(b"\r\n.", b"\r\n..")
    return (b"." + wire if wire.startswith(b".") else wire) + b".\r\n"


async def logged_in(address: tuple[str, int], user: str) -> Raw:
    raw = await Raw.connect(address)
    await raw.cmd("EHLO client.example")
    assert (await raw.cmd(f"AUTH PLAIN {plain(user, LOCAL_PASSWORD)}"))[:3] == "235"
    return raw


async def open_data(raw: Raw, sender: str, to: str) -> None:
    assert (await raw.cmd(f"MAIL FROM:<{sender}>")).startswith("250 ")
    assert (await raw.cmd(f"RCPT TO:<{to}>")).startswith("250 ")
    assert (await raw.cmd("DATA")).startswith("354 ")


async def write_in_pieces(raw: Raw, data: bytes, cuts: list[int], pause: float = 0.02) -> None:
    """One TCP write per piece, apart in time, so the proxy reads them separately."""
    for a, b in itertools.pairwise([0, *cuts, len(data)]):
        raw.writer.write(data[a:b])
        await raw.writer.drain()
        await asyncio.sleep(pause)


def lost_after_data(postfix: Postfix) -> int:
    return postfix.log_text().count("lost connection after DATA")


async def wait_lost_after_data(postfix: Postfix, before: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while lost_after_data(postfix) <= before:
        assert time.monotonic() < deadline, "Postfix did not see the connection drop"
        await asyncio.sleep(0.1)


async def postfix_log_until(postfix: Postfix, done: Callable[[str], bool],
                            timeout: float = 10.0) -> str:
    """Postfix's log once ``done`` finds in it what the test waits for (Postfix's log daemon
    writes a moment after the fact), or as it is after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done(log := postfix.log_text()) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return log


def envelope_senders(log: str, rcpt: str) -> list[str]:
    """The envelope senders Postfix logged for the messages it delivered to ``rcpt``."""
    ids = set(re.findall(rf"\]: (\w+): to=<{re.escape(rcpt)}>, .*status=sent", log))
    return [m[2] for m in re.finditer(r"\]: (\w+): from=<([^>]*)>", log) if m[1] in ids]


# Lines that are ".", "..", "..." and ".x" in the message, the last one just before the end.
DOT_LINES = b".\r\n..\r\n...\r\n.x\r\n..y\r\n. \r\nmiddle\r\n.\r\n..\r\n"


async def test_dot_lines_arrive_intact(harness: SmtpHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    sent = message(mail_user, mail_user, DOT_LINES, "dot lines")
    wire = stuff(sent)
    assert b"\r\n...\r\n.\r\n" in wire  # the ".." line is sent as "...", right before the end
    async with harness.run(harness.smtp_settings(mail_user)) as daemon:
        raw = await logged_in(daemon.address("smtp"), mail_user)
        await open_data(raw, mail_user, mail_user)
        raw.writer.write(wire)
        assert (await raw.reply()).startswith("250 2.0.0 Ok: queued")
        await raw.cmd("QUIT")
        await raw.close()
    (stored,) = await wait_delivered(harness.dovecot, mail_user, 1)
    assert same_message(stored, sent)


async def test_end_marker_split_across_writes(harness: SmtpHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    sent: list[bytes] = []
    async with harness.run(harness.smtp_settings(mail_user)) as daemon:
        raw = await logged_in(daemon.address("smtp"), mail_user)
        # Cut once at every position of the final "\r\n.\r\n" and just before it...
        for back in range(1, 8):
            sent.append(message(mail_user, mail_user, DOT_LINES, f"split {back}"))
            wire = stuff(sent[-1])
            await open_data(raw, mail_user, mail_user)
            await write_in_pieces(raw, wire, [len(wire) - back])
            assert (await raw.reply()).startswith("250 "), back
        # ... one byte per write, and odd-sized pieces ending with a pipelined command.
        sent.append(message(mail_user, mail_user, b"trickled\r\n" + DOT_LINES, "trickle"))
        wire = stuff(sent[-1])
        await open_data(raw, mail_user, mail_user)
        await write_in_pieces(raw, wire, list(range(1, len(wire))), pause=0.001)
        assert (await raw.reply()).startswith("250 ")
        sent.append(message(mail_user, mail_user, b"odd\r\n" + DOT_LINES, "odd chunks"))
        wire = stuff(sent[-1]) + b"NOOP\r\n"
        await open_data(raw, mail_user, mail_user)
        await write_in_pieces(raw, wire, list(range(7, len(wire), 7)))
        assert (await raw.reply()).startswith("250 ")
        assert (await raw.reply()).startswith("250 2.0.0")  # the NOOP read past the end
        await raw.cmd("QUIT")
        await raw.close()
    stored = await wait_delivered(harness.dovecot, mail_user, len(sent))
    for m in sent:
        assert sum(same_message(s, m) for s in stored) == 1


async def test_empty_message(harness: SmtpHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    async with harness.run(harness.smtp_settings(mail_user)) as daemon:
        raw = await logged_in(daemon.address("smtp"), mail_user)
        await open_data(raw, mail_user, mail_user)
        assert (await raw.cmd(".")).startswith("250 2.0.0 Ok: queued")
        await raw.close()
    (stored,) = await wait_delivered(harness.dovecot, mail_user, 1)
    assert stored.endswith(b"\n\n") or b"\n\n" not in stored  # headers Postfix added, no body


async def test_lines_longer_than_1000_octets(harness: SmtpHarness, mail_user: str) -> None:
    # RFC 5321 allows 1000 octets, but mature servers take longer lines (Postfix, Gmail):
    # the proxy relays them unchanged and lets the upstream decide.
    harness.provision(mail_user)
    long_lines = [b"a" * 1500, b"b" * 5000, (b"word " * 2000).rstrip()]
    sent = message(mail_user, mail_user, b"\r\n".join(long_lines) + b"\r\n", "long lines")
    async with harness.run(harness.smtp_settings(mail_user)) as daemon:
        raw = await logged_in(daemon.address("smtp"), mail_user)
        await open_data(raw, mail_user, mail_user)
        raw.writer.write(stuff(sent))
        assert (await raw.reply()).startswith("250 2.0.0 Ok: queued")
        await raw.close()
    (stored,) = await wait_delivered(harness.dovecot, mail_user, 1)
    # Postfix delivers them folded (CRLF SP inserted near 998 octets): nothing is lost.
    assert max(len(line) for line in stored.split(b"\n")) < 1000
    assert stored.replace(b"\n ", b"").endswith(sent.replace(b"\r\n", b"\n"))


async def test_null_sender(harness: SmtpHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    sent = message("MAILER-DAEMON@example.test", mail_user, b"a bounce\r\n", "bounce")
    async with harness.run(harness.smtp_settings(mail_user)) as daemon:
        raw = await logged_in(daemon.address("smtp"), mail_user)
        assert (await raw.cmd("MAIL FROM:<>")).startswith("250 2.1.0")
        assert (await raw.cmd(f"RCPT TO:<{mail_user}>")).startswith("250 ")
        assert (await raw.cmd("DATA")).startswith("354 ")
        raw.writer.write(stuff(sent))
        assert (await raw.reply()).startswith("250 ")
        assert (await raw.cmd("MAIL FROM:<> SIZE=100")).startswith("250 2.1.0")
        await raw.cmd("QUIT")
        await raw.close()
    (stored,) = await wait_delivered(harness.dovecot, mail_user, 1)
    assert stored.startswith(b"Return-Path: <>\n") and same_message(stored, sent)
    log = await postfix_log_until(harness.postfix,
                                  lambda log: bool(envelope_senders(log, mail_user)))
    assert envelope_senders(log, mail_user) == [""]  # this message's, not an earlier "<>"


async def test_size_limit_exceeded_mid_stream(harness: SmtpHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    settings = harness.smtp_settings(mail_user)
    settings.smtp.max_message_size = 10_000
    big = message(mail_user, mail_user, (b"q" * 98 + b"\r\n") * 500, "too big")
    small = message(mail_user, mail_user, b"fits\r\n", "small")
    before = lost_after_data(harness.postfix)
    async with harness.run(settings) as daemon:
        raw = await logged_in(daemon.address("smtp"), mail_user)
        await open_data(raw, mail_user, mail_user)
        wire = stuff(big)
        await write_in_pieces(raw, wire, list(range(4096, len(wire), 4096)))
        assert (await raw.reply()).startswith("552 5.3.4")
        await wait_lost_after_data(harness.postfix, before)  # the upstream's DATA aborted
        # The same session goes on: a new upstream connection for the next message.
        await open_data(raw, mail_user, mail_user)
        raw.writer.write(stuff(small))
        assert (await raw.reply()).startswith("250 ")
        await raw.cmd("QUIT")
        await raw.close()
    (stored,) = await wait_delivered(harness.dovecot, mail_user, 1)
    assert same_message(stored, small)


async def test_client_disconnects_mid_data(harness: SmtpHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    sent = message(mail_user, mail_user, (b"h" * 76 + b"\r\n") * 2000, "half")
    wire = stuff(sent)
    before = lost_after_data(harness.postfix)
    async with harness.run(harness.smtp_settings(mail_user)) as daemon:
        raw = await logged_in(daemon.address("smtp"), mail_user)
        await open_data(raw, mail_user, mail_user)
        await write_in_pieces(raw, wire[:len(wire) // 2], [4096, 60_000])
        raw.writer.transport.abort()
        await wait_lost_after_data(harness.postfix, before)
        # The proxy carries on with other sessions.
        raw = await logged_in(daemon.address("smtp"), mail_user)
        await open_data(raw, mail_user, mail_user)
        raw.writer.write(b"Subject: after\r\n\r\nafter\r\n.\r\n")
        assert (await raw.reply()).startswith("250 ")
        await raw.close()
    (stored,) = await wait_delivered(harness.dovecot, mail_user, 1)
    assert stored.endswith(b"\nafter\n")


async def test_slow_upload_is_not_idle(harness: SmtpHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    settings = harness.smtp_settings(mail_user)
    # Long enough for the login itself on a busy machine (scrypt, token, upstream AUTH).
    settings.smtp.idle_timeout = 2.0
    sent = message(mail_user, mail_user, (b"s" * 76 + b"\r\n") * 100, "slow")
    wire = stuff(sent)
    async with harness.run(settings) as daemon:
        # A first login pays the slow password hash and the token request, so the measured
        # session's AUTH is quick even on a busy machine.
        await (await logged_in(daemon.address("smtp"), mail_user)).close()
        raw = await logged_in(daemon.address("smtp"), mail_user)
        await open_data(raw, mail_user, mail_user)
        # About 5 s in all (over twice the idle timeout), never more than 0.5 s without a byte.
        await write_in_pieces(raw, wire, list(range(800, len(wire), 800)), pause=0.5)
        assert (await raw.reply()).startswith("250 ")
        await raw.close()
    (stored,) = await wait_delivered(harness.dovecot, mail_user, 1)
    assert same_message(stored, sent)


async def test_sender_and_first_recipient_refused_at_rcpt(harness: SmtpHarness,
                                                          mail_user: str) -> None:
    # MAIL goes upstream with the first RCPT (pipelined): what the upstream says about the
    # sender or that recipient is the reply to that RCPT, in its own words.
    harness.provision(mail_user)
    settings = harness.smtp_settings(mail_user)
    settings.smtp.max_message_size = MESSAGE_SIZE_LIMIT * 2  # more than Postfix takes
    sent = message(mail_user, mail_user, b"after the refusals\r\n", "refusals")
    async with harness.run(settings) as daemon:
        raw = await logged_in(daemon.address("smtp"), mail_user)
        assert (await raw.cmd(f"MAIL FROM:<{mail_user}> SIZE={MESSAGE_SIZE_LIMIT + 1}")
                ).startswith("250 ")
        reply = await raw.cmd(f"RCPT TO:<{mail_user}>")
        assert reply.startswith("552 5.3.4 Message size exceeds fixed limit")  # Postfix's
        assert (await raw.cmd(f"RCPT TO:<{mail_user}>")).startswith("552 5.3.4")
        assert (await raw.cmd("DATA")).startswith("503 ")
        assert (await raw.cmd("RSET")).startswith("250 ")
        assert (await raw.cmd(f"MAIL FROM:<{mail_user}>")).startswith("250 ")
        reply = await raw.cmd("RCPT TO:<nobody@example.test>")
        assert reply.startswith("550 5.1.1 <nobody@example.test>: Recipient address rejected")
        assert (await raw.cmd(f"RCPT TO:<{mail_user}>")).startswith("250 ")
        assert (await raw.cmd("DATA")).startswith("354 ")
        raw.writer.write(stuff(sent))
        assert (await raw.reply()).startswith("250 ")
        await raw.close()
    (stored,) = await wait_delivered(harness.dovecot, mail_user, 1)
    assert same_message(stored, sent)


@pytest.mark.parametrize("sender, expected", [
    (REFUSE_DATA_SENDER, "554 5.7.1 <{}>: Sender address rejected: no DATA from this sender today"),
    (DEFER_DATA_SENDER, "451 4.3.0 <{}>: Sender address rejected: DATA deferred for this sender"),
])
async def test_upstream_refuses_data(harness: SmtpHarness, mail_user: str, sender: str,
                                     expected: str) -> None:
    # The client gets our 354 at once (the upstream's comes while the message travels);
    # when the upstream refuses DATA instead, nothing reaches it and the client's message
    # gets the upstream's own refusal. The session goes on in step with the upstream.
    harness.provision(mail_user)
    sender = f"{sender}@example.test"
    expected = expected.format(sender)  # Postfix's words
    refused = message(sender, mail_user, b"line\r\n.leading dot\r\n" * 2000, "refused")
    sent = message(mail_user, mail_user, b"after the refusal\r\n", "after")
    async with harness.run(harness.smtp_settings(mail_user)) as daemon:
        raw = await logged_in(daemon.address("smtp"), mail_user)
        await open_data(raw, sender, mail_user)
        raw.writer.write(stuff(refused))
        assert await raw.reply() == expected
        await open_data(raw, mail_user, mail_user)
        raw.writer.write(stuff(sent))
        assert (await raw.reply()).startswith("250 ")
        # The same through aiosmtplib.
        client = await smtp_client(daemon.address("smtp"))
        await client.login(mail_user, LOCAL_PASSWORD)
        with pytest.raises(aiosmtplib.SMTPDataError) as info:
            await client.sendmail(sender, [mail_user], refused)
        assert f"{info.value.code} {info.value.message}" == expected
        await client.quit()
        await raw.close()
    (stored,) = await wait_delivered(harness.dovecot, mail_user, 1)
    assert same_message(stored, sent)

    def refusals(log: str) -> list[str]:
        return [line for line in log.splitlines() if f"from=<{sender}> to=<{mail_user}>" in line]

    log = await postfix_log_until(harness.postfix, lambda log: len(refusals(log)) >= 2)
    assert len(refusals(log)) == 2, refusals(log)
    assert all("reject: DATA from" in line for line in refusals(log)), refusals(log)


async def test_strict_one_to_one_waits_for_the_upstreams_replies(harness: SmtpHarness,
                                                                  mail_user: str) -> None:
    # [smtp] strict_one_to_one: MAIL and DATA are answered with the upstream's own replies.
    harness.provision(mail_user)
    settings = harness.smtp_settings(mail_user)
    settings.smtp.strict_one_to_one = True
    settings.smtp.max_message_size = MESSAGE_SIZE_LIMIT * 2  # more than Postfix takes
    refuser = f"{REFUSE_DATA_SENDER}@example.test"
    sent = message(mail_user, mail_user, b"strict\r\n", "strict")
    async with harness.run(settings) as daemon:
        raw = await logged_in(daemon.address("smtp"), mail_user)
        reply = await raw.cmd(f"MAIL FROM:<{mail_user}> SIZE={MESSAGE_SIZE_LIMIT + 1}")
        assert reply.startswith("552 5.3.4 Message size exceeds fixed limit")  # at MAIL
        # Postfix keeps the refused SIZE until RSET (it would refuse the next MAIL too).
        assert (await raw.cmd("RSET")).startswith("250 ")
        assert (await raw.cmd(f"MAIL FROM:<{refuser}>")).startswith("250 2.1.0")
        assert (await raw.cmd(f"RCPT TO:<{mail_user}>")).startswith("250 2.1.5")
        assert await raw.cmd("DATA") == (f"554 5.7.1 <{refuser}>: Sender address rejected: "
                                         "no DATA from this sender today")
        assert (await raw.cmd("RSET")).startswith("250 ")
        await open_data(raw, mail_user, mail_user)
        raw.writer.write(stuff(sent))
        assert (await raw.reply()).startswith("250 2.0.0 Ok: queued as ")
        await raw.close()
    (stored,) = await wait_delivered(harness.dovecot, mail_user, 1)
    assert same_message(stored, sent)


# ------------------------------------------------------------------- SMTP smuggling (issue 12)

# Postfix ends a message at a "." line whatever its line ends; the proxy must agree with it.
BARE_ENDS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n"]


@pytest.mark.parametrize("end", BARE_ENDS, ids=["lf-dot-lf", "lf-dot-crlf", "crlf-dot-lf"])
async def test_message_ended_with_bare_line_ends_is_answered_once(
        harness: SmtpHarness, mail_user: str, end: bytes) -> None:
    # It got no reply (421 after 300 s) although Postfix had delivered it: a client that
    # retried sent it twice.
    harness.provision(mail_user)
    sent = message(mail_user, mail_user, b"first line\nsecond line", "bare end")
    async with harness.run(harness.smtp_settings(mail_user)) as daemon:
        raw = await logged_in(daemon.address("smtp"), mail_user)
        await open_data(raw, mail_user, mail_user)
        raw.writer.write(sent + end)
        reply = await asyncio.wait_for(raw.reply(), 15)
        assert reply.startswith("250 2.0.0 Ok: queued"), reply
        assert (await raw.cmd("NOOP")).startswith("250 2.0.0")
        await raw.cmd("QUIT")
        await raw.close()
    (stored,) = await wait_delivered(harness.dovecot, mail_user, 1)
    assert b"first line\nsecond line\n" in stored.replace(b"\r\n", b"\n")


@pytest.mark.parametrize("end", BARE_ENDS, ids=["lf-dot-lf", "lf-dot-crlf", "crlf-dot-lf"])
async def test_commands_hidden_after_a_bare_end_run_through_the_proxy(
        harness: SmtpHarness, mail_user: str, end: bytes,
        caplog: pytest.LogCaptureFixture) -> None:
    # They ran upstream as a second message the proxy never saw nor logged.
    caplog.set_level(logging.INFO, logger="mailproxy")
    harness.provision(mail_user)
    first = message(mail_user, mail_user, b"visible\r\n", "first")
    hidden = message(mail_user, mail_user, b"hidden\r\n", "smuggled")
    wire = (first + end + f"MAIL FROM:<{mail_user}>\r\nRCPT TO:<{mail_user}>\r\nDATA\r\n"
            .encode() + hidden + b".\r\n")
    async with harness.run(harness.smtp_settings(mail_user)) as daemon:
        raw = await logged_in(daemon.address("smtp"), mail_user)
        await open_data(raw, mail_user, mail_user)
        raw.writer.write(wire)
        # The end of the first message, then MAIL, RCPT and DATA of the second, here.
        replies = [await asyncio.wait_for(raw.reply(), 15) for _ in range(4)]
        assert [r[:3] for r in replies] == ["250", "250", "250", "354"], replies
        last = await asyncio.wait_for(raw.reply(), 15)
        assert last.startswith("250 2.0.0 Ok: queued"), last
        await raw.cmd("QUIT")
        await raw.close()
    stored = await wait_delivered(harness.dovecot, mail_user, 2)
    # Each message is delivered on its own, and the proxy relayed (and logged) both.
    assert sum(b"Subject: first" in s and b"hidden" not in s for s in stored) == 1
    assert sum(b"Subject: smuggled" in s for s in stored) == 1
    assert caplog.text.count(" recipient(s) via ") == 2


async def test_helo_inside_a_transaction_resets_the_upstream(harness: SmtpHarness,
                                                             mail_user: str) -> None:
    # Only EHLO reset the upstream's transaction: after HELO the next MAIL got a 503.
    harness.provision(mail_user)
    sent = message(mail_user, mail_user, b"after HELO\r\n", "helo")
    async with harness.run(harness.smtp_settings(mail_user)) as daemon:
        raw = await logged_in(daemon.address("smtp"), mail_user)
        assert (await raw.cmd(f"MAIL FROM:<{mail_user}>")).startswith("250 ")
        assert (await raw.cmd(f"RCPT TO:<{mail_user}>")).startswith("250 ")
        assert (await raw.cmd("HELO client.example")).startswith("250 ")
        await open_data(raw, mail_user, mail_user)
        raw.writer.write(stuff(sent))
        assert (await raw.reply()).startswith("250 2.0.0 Ok: queued")
        await raw.cmd("QUIT")
        await raw.close()
    (stored,) = await wait_delivered(harness.dovecot, mail_user, 1)
    assert same_message(stored, sent)
