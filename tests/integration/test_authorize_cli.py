"""`mailproxy authorize` as a person runs it, against the test token endpoint: the browser is a
process following the authorize redirect; then the account works through the proxy."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.support.clirun import ROOT, mailproxy, running_daemon, write_config
from tests.support.dovecot import Dovecot
from tests.support.imapclient import tagged_status
from tests.support.tokenserver import TokenServer


def browser_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPROXY_")}
    env["BROWSER"] = f"{sys.executable} -m tests.support.fakebrowser %s"
    env["PYTHONPATH"] = str(ROOT)
    return env


def account_keys(token_server: TokenServer, flow: str = "authorization_code") -> str:
    return (f'flow = "{flow}"\nauthorize_url = "{token_server.authorize_url}"\n'
            f'device_authorization_url = "{token_server.device_authorization_url}"')


async def test_browser_flow_then_login(tmp_path: Path, token_server: TokenServer,
                                       dovecot: Dovecot, mail_user: str) -> None:
    config = write_config(tmp_path, token_server, dovecot, mail_user,
                          account=account_keys(token_server))
    token_server.authority.consent_user = mail_user
    done = mailproxy("authorize", mail_user, "--generate-password", "--config", str(config),
                     env=browser_env())
    assert done.returncode == 0, done.stderr
    assert "code_challenge_method=S256" in done.stderr  # the printed sign-in address
    password = re.search(r"\(shown once\): (\S+)", done.stdout)
    assert password, done.stdout
    assert len(token_server.authority.requests_for("authorization_code")) == 1
    async with running_daemon(config) as daemon:
        client = await daemon.connect()
        assert tagged_status(await client.login(mail_user, password[1])).startswith(b"t1 OK")
        await client.close()
    assert password[1] not in daemon.stderr


def test_manual_flow_pastes_the_redirect(tmp_path: Path, token_server: TokenServer,
                                         dovecot: Dovecot, mail_user: str) -> None:
    config = write_config(tmp_path, token_server, dovecot, mail_user,
                          account=account_keys(token_server))
    token_server.authority.consent_user = mail_user
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "authorize", mail_user, "--manual", "--config",
         str(config)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=browser_env())
    assert proc.stdin and proc.stderr
    url = None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        found = re.search(r"(http://127\.0\.0\.1:\d+/authorize\?\S+)", line)
        if found:
            url = found[1]
            break
    assert url, "".join(seen)
    # The person opens it on another machine; the browser lands on an address nothing serves.
    location = httpx.get(url, follow_redirects=False).headers["location"]
    out, err = proc.communicate(f"{location}\nmanual pw\nmanual pw\n", timeout=60)
    assert proc.returncode == 0, err
    assert f"{mail_user} is authorized" in out
    status = mailproxy("status", "--config", str(config))
    assert f"{mail_user} (authorization_code): authorized" in status.stdout


def test_device_flow_and_one_authorization_at_a_time(
        tmp_path: Path, token_server: TokenServer, dovecot: Dovecot, mail_user: str) -> None:
    config = write_config(tmp_path, token_server, dovecot, mail_user,
                          account=account_keys(token_server, "device_code"))
    authority = token_server.authority
    authority.device_interval = 0.2
    before = set(authority.pending_user_codes())  # not this test's: never approve those
    approved = threading.Event()

    def new_codes() -> list[str]:
        return [c for c in authority.pending_user_codes() if c not in before]

    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "authorize", mail_user, "--config", str(config)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=browser_env())
    try:
        # It takes the lock before it asks for a code: once its code is out, it holds it.
        deadline = time.monotonic() + 30
        while not new_codes():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the first authorize showed no code in 30 s"
            time.sleep(0.05)
        [code] = new_codes()
        second = mailproxy("authorize", mail_user, "--config", str(config), env=browser_env())
        assert second.returncode == 1
        assert f"another `mailproxy authorize {mail_user}` is already running (pid {proc.pid})" \
            in second.stderr
        assert new_codes() == [code]  # refused before it asked for one

        def person() -> None:  # enters the code on "another device" while it polls
            for _ in range(600):
                if (code, "authorization_pending") in authority.device_polls:
                    authority.approve_device(code, mail_user)
                    approved.set()
                    return
                time.sleep(0.05)

        thread = threading.Thread(target=person)
        thread.start()
        out, err = proc.communicate("device pw\n", timeout=60)
        thread.join()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert approved.is_set()
    assert proc.returncode == 0, err
    assert "authorization_pending" not in err  # polling is quiet, the person sees a countdown
    assert f"{mail_user} is authorized" in out


async def test_gmail_device_flow_is_refused_with_advice(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'state_dir = "{tmp_path}/state"\n[[accounts]]\naddress = "x@gmail.com"\n'
                      'provider = "gmail"\nclient_id = "id"\nflow = "device_code"\n')
    done = await asyncio.to_thread(mailproxy, "authorize", "x@gmail.com", "--config",
                                   str(config))
    assert done.returncode == 1
    assert "Google" in done.stderr and "--manual" in done.stderr
    assert "Traceback" not in done.stderr
