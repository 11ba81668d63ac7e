"""The daemon's log as a person and fail2ban read it (issue 10 item 8, issue 13 item 5): a real
daemon in its own process, real logins, its standard error checked line by line."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest

from tests.support.clirun import ROOT, listen_port, mailproxy, running_daemon, write_config
from tests.support.dovecot import Dovecot
from tests.support.imapclient import tagged_status
from tests.support.tokenserver import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TokenServer

FILTER = ROOT / "contrib" / "fail2ban" / "filter.d" / "mailproxy.conf"
LOCAL_PW = "local pw 1"


def _ports(config: Path) -> dict[str, int]:
    ports = [int(x.rsplit(":", 1)[1].rstrip('"')) for x in config.read_text().splitlines()
             if x.startswith('listen = "127.')]
    return dict(zip(("imap", "pop3", "smtp"), ports, strict=True))


def _provision(config: Path, token_server: TokenServer, user: str, *verify: str) -> str:
    """Import a refresh token; with "--no-verify" no access token is stored, so the first
    login makes a token request."""
    rt = token_server.authority.issue_refresh_token(user, TEST_CLIENT_ID)
    done = mailproxy("token", "import", user, "--config", str(config), *verify,
                     stdin=f"{rt}\n{LOCAL_PW}\n")
    assert done.returncode == 0, done.stderr
    return rt


async def _pop3_login(port: int, user: str, password: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readline()
        writer.write(f"USER {user}\r\n".encode())
        await reader.readline()
        writer.write(f"PASS {password}\r\n".encode())
        return await reader.readline()
    finally:
        writer.close()


def _smtp_login(port: int, user: str, password: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()
        try:
            smtp.login(user, password)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code
        return 235


async def _scripted_logins(config: Path, user: str, env: dict[str, str] | None = None) -> str:
    """One good IMAP login, then wrong passwords over IMAP, POP3 and SMTP and an unknown user;
    the daemon's standard error."""
    ports = _ports(config)
    async with running_daemon(config, env=env) as daemon:
        client = await daemon.connect()
        assert tagged_status(await client.login(user, LOCAL_PW)).startswith(b"t1 OK")
        await client.close()
        client = await daemon.connect()
        assert tagged_status(await client.login(user, "wrong")).startswith(b"t1 NO")
        await client.close()
        assert (await _pop3_login(ports["pop3"], "nobody@example.test", "x")).startswith(b"-ERR")
        assert await asyncio.to_thread(_smtp_login, ports["smtp"], user, "wrong") == 535
        await asyncio.sleep(0.5)  # the session-end lines
    return daemon.stderr


def _fail2ban_matches(log: str, tmp_path: Path) -> list[str]:
    """The hosts fail2ban-regex finds in ``log`` with the shipped filter."""
    tool = shutil.which("fail2ban-regex")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("fail2ban-regex missing (CI is set: .ci/run installs fail2ban)")
        pytest.skip("fail2ban-regex missing (Debian package fail2ban)")
    logfile = tmp_path / "mailproxy.log"
    logfile.write_text(log)
    done = subprocess.run([tool, "--print-all-matched", "--raw", str(logfile), str(FILTER)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    total = re.search(r"^Failregex: (\d+) total", done.stdout, re.MULTILINE)
    assert total is not None, done.stdout
    section = done.stdout.split("|- Matched line(s):", 1)[1].split("`-", 1)[0]
    matched = [line for line in section.splitlines() if " refused for " in line]
    assert int(total.group(1)) == len(matched), done.stdout
    return matched


@pytest.fixture
def config(tmp_path: Path, token_server: TokenServer, dovecot: Dovecot, mail_user: str) -> Path:
    return write_config(tmp_path, token_server, dovecot, mail_user, account="""
pop3_server = "127.0.0.1:9"
smtp_server = "127.0.0.1:9"
""")


async def test_text_log_banner_sessions_and_fail2ban(
        config: Path, token_server: TokenServer, mail_user: str, tmp_path: Path) -> None:
    rt = _provision(config, token_server, mail_user)
    log = await _scripted_logins(config, mail_user)
    assert "Traceback" not in log
    for secret in (LOCAL_PW, "wrong", rt, TEST_CLIENT_SECRET):
        assert secret not in log
    # The banner: version, configuration, state directory, listeners, accounts.
    assert re.search(rf"mailproxy \S+ starting: configuration {re.escape(str(config))}, state "
                     rf"directory {re.escape(str(tmp_path / 'state'))}", log), log
    assert f"imap listening on 127.0.0.1:{listen_port(config)}" in log
    assert re.search(rf"account {re.escape(mail_user)} \(custom, flow authorization_code\): "
                     r"imap via 127\.0\.0\.1:\d+", log), log
    # Every session line carries protocol, peer and session id; each session ends with a line.
    session = re.compile(r" \[(imap|pop3|smtp) 127\.0\.0\.1:\d+ s=[0-9a-f]{8}\] ")
    logins = [x for x in log.splitlines() if " login " in x and "mailproxy.login" in x]
    # 1 accepted; refused: imap, pop3, and smtp twice (smtplib tries PLAIN, then LOGIN).
    assert len(logins) == 5, log
    assert all(session.search(x) for x in logins), logins
    ends = [x for x in log.splitlines() if "session ended after" in x]
    assert len(ends) >= 4 and all(session.search(x) for x in ends), log
    # The good session ended when its client left, not at shutdown.
    assert log.index("session ended") < log.index("shutting down")
    good = next(x for x in ends if "imap" in x and "bytes from the client" in x)
    counts = re.search(r"(\d+) bytes from the client, (\d+) to it", good)
    assert counts and int(counts.group(1)) > 0 and int(counts.group(2)) > 0, good
    # fail2ban: the wrong passwords and the unknown user, never the good login.
    matched = _fail2ban_matches(log, tmp_path)
    assert len(matched) == 4, matched
    assert not any(" login for " in x for x in matched)


async def test_json_log_lines_and_fail2ban(
        config: Path, token_server: TokenServer, mail_user: str, tmp_path: Path) -> None:
    config.write_text('log_format = "JSON"\n' + config.read_text())
    _provision(config, token_server, mail_user)
    log = await _scripted_logins(config, mail_user)
    records = [json.loads(line) for line in log.splitlines()]
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    logins = [r for r in records if r["logger"] == "mailproxy.login" and " login " in
              r["message"]]
    assert len(logins) >= 4
    for record in logins:
        assert record["protocol"] in ("imap", "pop3", "smtp")
        assert re.fullmatch(r"127\.0\.0\.1:\d+", record["peer"])
        assert re.fullmatch(r"[0-9a-f]{8}", record["session"])
    accepted = next(r for r in logins if "refused" not in r["message"])
    assert accepted["account"] == mail_user
    assert len(_fail2ban_matches(log, tmp_path)) == 4


async def test_debug_shows_the_dialogue_without_secrets(
        config: Path, token_server: TokenServer, mail_user: str) -> None:
    config.write_text('log_level = "DEBUG"\n' + config.read_text())
    rt = _provision(config, token_server, mail_user, "--no-verify")
    log = await _scripted_logins(config, mail_user)
    assert re.search(r"mailproxy\.session: \[imap [^]]+\] C: t1 LOGIN \[\d+ bytes hidden\]", log)
    assert re.search(r"mailproxy\.session: \[pop3 [^]]+\] C: USER nobody@example.test", log)
    assert re.search(r"\] S: \* OK", log), log
    plain = base64.b64encode(f"\0{mail_user}\0wrong".encode()).decode()
    for secret in (LOCAL_PW, "wrong", plain, rt, TEST_CLIENT_SECRET):
        assert secret not in log, secret
    assert "HTTP Request" in log  # httpx's request lines appear at debug only
    assert "mailproxy.session: [smtp" in log


async def test_info_level_keeps_httpx_quiet(config: Path, token_server: TokenServer,
                                            mail_user: str) -> None:
    _provision(config, token_server, mail_user, "--no-verify")
    log = await _scripted_logins(config, mail_user)
    assert "refresh_token grant ok" in log  # a token request was made...
    assert "HTTP Request" not in log  # ...without httpx's line
    assert " C: " not in log


async def test_revoked_account_reported_at_start_while_its_vault_is_locked(
        config: Path, token_server: TokenServer, mail_user: str) -> None:
    rt = _provision(config, token_server, mail_user, "--no-verify")
    token_server.authority.revoke_refresh_token(rt)
    async with running_daemon(config) as daemon:
        client = await daemon.connect()
        assert b"not authorized" in tagged_status(await client.login(mail_user, LOCAL_PW))
        await client.close()
    # Restarted without a master key: the vault is locked, the reason is known all the same.
    async with running_daemon(config) as daemon:
        pass
    assert re.search(rf"WARNING mailproxy: account {re.escape(mail_user)} is not authorized "
                     r"\(invalid_grant[^)]*\)+: run `mailproxy authorize", daemon.stderr), \
        daemon.stderr
