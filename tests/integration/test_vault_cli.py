"""Local passwords, status and notifications as a user meets them: CLI processes, a daemon
process, IMAP logins through it."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from tests.support.clirun import DaemonProcess, mailproxy, running_daemon, write_config
from tests.support.dovecot import Dovecot
from tests.support.imapclient import tagged_status
from tests.support.tokenserver import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TokenServer


def tree(state: Path) -> dict[str, bytes]:
    return {str(p.relative_to(state)): p.read_bytes()
            for p in sorted(state.rglob("*")) if p.is_file() and p.suffix != ".lock"}


async def login(daemon: DaemonProcess, user: str, password: str) -> bytes:
    client = await daemon.connect()
    try:
        return tagged_status(await client.login(user, password))
    finally:
        await client.close()


async def test_several_passwords_add_list_remove(tmp_path: Path, token_server: TokenServer,
                                                 dovecot: Dovecot, mail_user: str) -> None:
    config = write_config(tmp_path, token_server, dovecot, mail_user)
    cfg = ("--config", str(config))
    rt = token_server.authority.issue_refresh_token(mail_user, TEST_CLIENT_ID)
    done = mailproxy("token", "import", mail_user, *cfg, stdin=f"{rt}\nlaptop pw\n")
    assert done.returncode == 0, done.stderr
    # add: the new password first, then one that opens the vault.
    done = mailproxy("password", "add", mail_user, "--label", "phone", *cfg,
                     stdin="phone pw\nlaptop pw\n")
    assert done.returncode == 0, done.stderr
    state = tmp_path / "state"
    before = tree(state)
    done = mailproxy("password", "add", mail_user, "--label", "tablet", *cfg,
                     stdin="tablet pw\nnot the password\n")
    assert done.returncode == 1 and "does not open the vault" in done.stderr
    done = mailproxy("password", "remove", mail_user, "phone", *cfg, stdin="wrong\n")
    assert done.returncode == 1
    assert tree(state) == before  # a wrong password changed nothing
    listing = mailproxy("password", "list", mail_user, *cfg)
    assert listing.returncode == 0
    assert [line.split()[0] for line in listing.stdout.splitlines()] == ["default", "phone"]

    async with running_daemon(config) as daemon:
        assert (await login(daemon, mail_user, "laptop pw")).startswith(b"t1 OK")
        assert (await login(daemon, mail_user, "phone pw")).startswith(b"t1 OK")
        # The phone is lost: its password goes, while the daemon runs.
        done = mailproxy("password", "remove", mail_user, "phone", *cfg, stdin="laptop pw\n")
        assert done.returncode == 0, done.stderr
        assert (await login(daemon, mail_user, "phone pw")).startswith(b"t1 NO")
        assert (await login(daemon, mail_user, "laptop pw")).startswith(b"t1 OK")
        done = mailproxy("password", "remove", mail_user, "default", *cfg, stdin="laptop pw\n")
        assert done.returncode == 1 and "last password" in done.stderr
    for name, data in tree(state).items():
        # Whole secrets only: a short fragment such as b"pw" turns up in base64 by chance.
        for secret in (rt, "laptop pw", "phone pw", "tablet pw"):
            assert secret.encode() not in data, (name, secret)
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    assert rt not in daemon.stderr and "laptop pw" not in daemon.stderr


async def test_status_from_disk_and_from_the_daemon(tmp_path: Path, token_server: TokenServer,
                                                    dovecot: Dovecot, mail_user: str) -> None:
    config = write_config(tmp_path, token_server, dovecot, mail_user)
    cfg = ("--config", str(config))
    done = mailproxy("status", *cfg)
    assert done.returncode == 3, done.stderr  # no daemon
    assert "no daemon running" in done.stdout
    assert f"{mail_user} (authorization_code): NOT AUTHORIZED: not authorized yet" in done.stdout
    rt = token_server.authority.issue_refresh_token(mail_user, TEST_CLIENT_ID)
    assert mailproxy("token", "import", mail_user, *cfg, stdin=f"{rt}\npw\n").returncode == 0
    report = json.loads(mailproxy("status", "--json", *cfg).stdout)
    assert report["source"] == "disk"
    (account,) = report["accounts"]
    assert account["authorized"] is True and account["passwords"] == 1
    assert isinstance(account["expires_at"], float)

    async with running_daemon(config) as daemon:
        report = json.loads(mailproxy("status", "--json", *cfg).stdout)
        assert report["source"] == "daemon" and report["pid"] == daemon.proc.pid
        (account,) = report["accounts"]
        assert account["locked"] is True  # no master key, no login yet
        assert (await login(daemon, mail_user, "pw")).startswith(b"t1 OK")
        report = json.loads(mailproxy("status", "--json", *cfg).stdout)
        (account,) = report["accounts"]
        assert account["locked"] is False and account["authorized"] is True
        assert account["access_token_valid"] is True
        assert isinstance(account["next_refresh"], float)
        text = mailproxy("status", *cfg).stdout
        assert f"daemon running (pid {daemon.proc.pid})" in text
        assert "vault open" in text and "next refresh:" in text
        assert rt not in json.dumps(report)


HOOK = """
import json, os, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({k: v for k, v in os.environ.items() if k.startswith("MAILPROXY_")}) + "\\n")
"""


async def test_hook_fires_once_when_authorization_is_needed(
        tmp_path: Path, token_server: TokenServer, dovecot: Dovecot, mail_user: str) -> None:
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    out = tmp_path / "events.jsonl"
    config = write_config(tmp_path, token_server, dovecot, mail_user,
                          top=f'[notify]\ncommand = "{sys.executable} {hook} {out}"')
    cfg = ("--config", str(config))
    rt = token_server.authority.issue_refresh_token(mail_user, TEST_CLIENT_ID)
    assert mailproxy("token", "import", mail_user, "--no-verify", *cfg,
                     stdin=f"{rt}\npw\n").returncode == 0
    token_server.authority.revoke_refresh_token(rt)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPROXY_")}
    for _ in range(2):  # the second run of the daemon must not repeat the notification
        async with running_daemon(config, env=env) as daemon:
            for _ in range(2):
                status = (await login(daemon, mail_user, "pw")).decode()
                assert f"mailproxy authorize {mail_user}" in status
            for _ in range(50):
                if out.exists():
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 1
    (event,) = lines
    assert event["MAILPROXY_ACCOUNT"] == mail_user
    assert event["MAILPROXY_EVENT"] == "authorization_required"
    assert "invalid_grant" in event["MAILPROXY_REASON"]
    assert "MAILPROXY_TIME" in event
    assert rt not in out.read_text() and TEST_CLIENT_SECRET not in out.read_text()
    report = json.loads(mailproxy("status", "--json", *cfg).stdout)
    (account,) = report["accounts"]
    assert account["authorized"] is False and "invalid_grant" in account["needs_authorization"]
    assert [k.split(":")[0] for k in account["notifications"]] == ["authorization_required"]


@pytest.mark.parametrize("source", ["env", "file"])
async def test_master_key_sources_open_the_vault_at_start(
        tmp_path: Path, token_server: TokenServer, dovecot: Dovecot, mail_user: str,
        source: str) -> None:
    key = "bWFzdGVyIGtleSBtYXRlcmlhbCwgbG9uZyBlbm91Z2gh"  # base64 of 33 bytes
    key_file = tmp_path / "master.key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    spec = "env:MP_MASTER" if source == "env" else f"file:{key_file}"
    config = write_config(tmp_path, token_server, dovecot, mail_user,
                          top=f'[vault]\nmaster_key = "{spec}"')
    cfg = ("--config", str(config))
    env = {**os.environ, "MP_MASTER": key}
    rt = token_server.authority.issue_refresh_token(mail_user, TEST_CLIENT_ID)
    done = mailproxy("token", "import", mail_user, "--no-verify", *cfg, stdin=f"{rt}\npw\n",
                     env=env)
    assert done.returncode == 0, done.stderr
    async with running_daemon(config, env=env) as daemon:
        for _ in range(100):  # refreshed at start-up, before any login
            if token_server.authority.requests_for("refresh_token"):
                break
            await asyncio.sleep(0.05)
        assert len(token_server.authority.requests_for("refresh_token")) == 1
        assert (await login(daemon, mail_user, "pw")).startswith(b"t1 OK")
    assert len(token_server.authority.requests_for("refresh_token")) == 1
    # Without the key the daemon refuses to start, saying why.
    env.pop("MP_MASTER")
    key_file.unlink()
    done = mailproxy("run", *cfg, env=env)
    assert done.returncode == 2  # a start-up mistake (README: exit status)
    assert "cannot start: " in done.stderr and "Traceback" not in done.stderr
