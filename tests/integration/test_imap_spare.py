"""Spare upstream IMAP sessions ([imap] spare_sessions) against the real Dovecot: a second
login takes the spare made after the first, a spare the server closed is not handed out, a
wrong password takes none, and spare_sessions = 0 makes none."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path

import pytest

from proxy.config import Settings
from proxy.daemon.server import Daemon
from tests.support.dovecot import Dovecot
from tests.support.imapclient import RawImap, fetch_direct, tagged_status
from tests.support.proxyrun import LOCAL_PASSWORD, ProxyHarness
from tests.support.tokenserver import TokenServer

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: Bob <bob@example.test>\r\n"
           b"Subject: spare\r\nMessage-ID: <spare@example.test>\r\n\r\n"
           + b"line of text\r\n" * 200)


@pytest.fixture
def harness(tmp_path: Path, token_server: TokenServer, dovecot: Dovecot) -> ProxyHarness:
    return ProxyHarness(tmp_path / "state", token_server, dovecot)


def spare_count(daemon: Daemon, result: str) -> float:
    value = daemon.metrics.registry.get_sample_value(
        "mailproxy_upstream_spare_total", {"protocol": "imap", "result": result})
    return value or 0.0


async def spare_ready(daemon: Daemon, user: str) -> None:
    async with asyncio.timeout(10):
        while not daemon.spares.pool.idle(user.casefold()):
            await asyncio.sleep(0.02)


async def log_in(daemon: Daemon, user: str,
                 password: str = LOCAL_PASSWORD) -> tuple[RawImap, bytes]:
    client = await RawImap.connect(*daemon.address("imap"))
    return client, tagged_status(await client.login(user, password))


def login_lines(caplog: pytest.LogCaptureFixture, user: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith(f"imap login for {user} ")]


async def test_second_login_takes_the_spare_and_works(
        harness: ProxyHarness, dovecot: Dovecot, token_server: TokenServer, mail_user: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailproxy")
    harness.provision(mail_user)
    dovecot.deliver(mail_user, MESSAGE)
    expected = await fetch_direct(dovecot.host, dovecot.imaps_port, dovecot.ca_file, mail_user,
                                  token_server.authority.issue_access_token(mail_user),
                                  "FETCH 1 (UID BODY.PEEK[])")

    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        first, status = await log_in(daemon, mail_user)
        assert status.startswith(b"t1 OK [CAPABILITY IMAP4rev1 ")
        await first.close()
        await spare_ready(daemon, mail_user)
        client, status = await log_in(daemon, mail_user)
        # The reply is what the server said at the spare's login: its capabilities.
        assert status.startswith(b"t1 OK [CAPABILITY IMAP4rev1 ") and b"IDLE" in status
        assert spare_count(daemon, "hit") == 1
        assert tagged_status(await client.command("SELECT INBOX")).startswith(b"t2 OK")
        fetched = await client.command("FETCH 1 (UID BODY.PEEK[])")
        assert fetched.rsplit(b"t3 OK", 1)[0] == expected.rsplit(b"t3 OK", 1)[0]
        assert MESSAGE in fetched
        await client.close()
        await spare_ready(daemon, mail_user)  # and another is made for the next one
    lines = login_lines(caplog, mail_user)
    assert len(lines) == 2 and "(spare)" not in lines[0] and "(spare) in " in lines[1], lines


async def test_spare_closed_by_the_server_is_not_handed_out(
        harness: ProxyHarness, dovecot: Dovecot, mail_user: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailproxy")
    harness.provision(mail_user)
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        first, _ = await log_in(daemon, mail_user)
        await first.close()
        await spare_ready(daemon, mail_user)
        # The server ends the session (an administrator's kick, an autologout, a restart).
        subprocess.run(["doveadm", "-c", str(dovecot.config_path), "kick", mail_user],
                       check=True, capture_output=True, timeout=30)
        spare = daemon.spares.pool._idle[mail_user.casefold()][0][1]
        async with asyncio.timeout(10):
            while spare.connected:
                await asyncio.sleep(0.02)
        client, status = await log_in(daemon, mail_user)
        assert status.startswith(b"t1 OK [CAPABILITY"), status
        assert tagged_status(await client.command("SELECT INBOX")).startswith(b"t2 OK")
        await client.close()
        assert (spare_count(daemon, "stale"), spare_count(daemon, "hit")) == (1, 0)
    assert all("(spare)" not in line for line in login_lines(caplog, mail_user))


async def test_wrong_password_never_takes_the_spare(harness: ProxyHarness,
                                                    mail_user: str) -> None:
    harness.provision(mail_user)
    async with harness.run(harness.settings(harness.account(mail_user))) as daemon:
        first, _ = await log_in(daemon, mail_user)
        await first.close()
        await spare_ready(daemon, mail_user)
        assert [spare_count(daemon, r) for r in ("hit", "miss", "stale")] == [0, 1, 0]
        client, status = await log_in(daemon, mail_user, "wrong password")
        assert status == b"t1 NO [AUTHENTICATIONFAILED] Invalid credentials"
        await client.close()
        assert daemon.spares.pool.idle(mail_user.casefold()) == 1
        assert [spare_count(daemon, r) for r in ("hit", "miss", "stale")] == [0, 1, 0]
        # The right password then gets it.
        client, status = await log_in(daemon, mail_user)
        assert status.startswith(b"t1 OK")
        assert spare_count(daemon, "hit") == 1
        await client.close()


async def test_spare_sessions_zero_makes_none(harness: ProxyHarness, mail_user: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailproxy")
    harness.provision(mail_user)
    settings: Settings = harness.settings(harness.account(mail_user))
    settings.imap.spare_sessions = 0
    async with harness.run(settings) as daemon:
        for _ in range(2):
            client, status = await log_in(daemon, mail_user)
            assert status.startswith(b"t1 OK")
            await client.close()
            await asyncio.sleep(0.3)  # time enough for a spare, were one being made
            assert daemon.spares.pool.idle(mail_user.casefold()) == 0
            assert not daemon.spares._making
    assert sum(spare_count(daemon, r) for r in ("hit", "miss", "stale")) == 0
    lines = login_lines(caplog, mail_user)
    assert len(lines) == 2 and all("(spare)" not in line for line in lines)
