"""``mailproxy reload``, ``health`` and ``check`` as a user runs them: separate processes, a
config file, the daemon started with ``mailproxy run``, SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import socketserver
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from proxy.tokens.store import TokenState
from proxy.vault import Vault
from tests.support.clirun import ROOT, listen_port, mailproxy, write_config
from tests.support.dovecot import Dovecot
from tests.support.imapclient import RawImap, tagged_status
from tests.support.servers import free_port
from tests.support.tlsca import TestCA
from tests.support.tokenserver import TEST_CLIENT_ID, TokenServer

PASSWORD = "local pw"


def provision(config: Path, token_server: TokenServer, address: str) -> str:
    rt = token_server.authority.issue_refresh_token(address, TEST_CLIENT_ID)
    Vault(config.parent / "state").create(address.casefold(), password=PASSWORD,
                                          state=TokenState(refresh_token=rt))
    return rt


@contextlib.asynccontextmanager
async def daemon(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(config), cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        for _ in range(150):
            if mailproxy("health", "--config", str(config)).returncode == 0:
                break
            assert proc.returncode is None, "mailproxy run exited"
            await asyncio.sleep(0.1)
        else:
            pytest.fail("mailproxy run did not become healthy")
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def login_ok(port: int, user: str) -> bool:
    client = await RawImap.connect("127.0.0.1", port)
    try:
        return tagged_status(await client.login(user, PASSWORD)).startswith(b"t1 OK")
    finally:
        await client.close()


async def test_reload_refuses_what_does_not_load_and_the_old_one_serves(
        tmp_path: Path, token_server: TokenServer, dovecot: Dovecot, mail_user: str) -> None:
    config = write_config(tmp_path, token_server, dovecot, mail_user)
    provision(config, token_server, mail_user)
    good = config.read_text()
    port = listen_port(config)
    async with daemon(config) as proc:
        done = mailproxy("reload", "--config", str(config))
        assert done.returncode == 0 and "reloaded: no changes" in done.stdout, done.stderr

        config.write_text(good + "\n[imap\n")  # not TOML
        done = mailproxy("reload", "--config", str(config))
        assert done.returncode == 2 and "not valid TOML" in done.stderr, done.stderr
        proc.send_signal(signal.SIGHUP)  # the daemon reads the broken file itself
        await asyncio.sleep(0.5)
        assert proc.returncode is None
        assert await login_ok(port, mail_user)

        # Loads, but cannot be applied: the new port is taken. The daemon says why.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            config.write_text(good.replace(f"127.0.0.1:{port}",
                                           f"127.0.0.1:{taken.getsockname()[1]}"))
            done = mailproxy("reload", "--config", str(config))
        assert done.returncode == 2, done
        assert "reload refused, the running configuration stays" in done.stderr
        assert "in use" in done.stderr
        assert await login_ok(port, mail_user)

        moved = free_port()
        config.write_text(good.replace(f"127.0.0.1:{port}", f"127.0.0.1:{moved}"))
        done = mailproxy("reload", "--config", str(config))
        assert done.returncode == 0, done.stderr
        assert f"imap listener moved from 127.0.0.1:{port} to 127.0.0.1:{moved}" in done.stdout
        assert await login_ok(moved, mail_user)
        with pytest.raises(OSError):
            await RawImap.connect("127.0.0.1", port)

        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    log = stderr.decode()
    assert "reload refused, the running configuration stays" in log and "not valid TOML" in log
    done = mailproxy("health", "--config", str(config))
    assert done.returncode == 1 and "no daemon is running" in done.stderr


async def test_health_over_metrics(tmp_path: Path, token_server: TokenServer,
                                   dovecot: Dovecot, mail_user: str) -> None:
    metrics = free_port()
    config = write_config(tmp_path, token_server, dovecot, mail_user,
                          top=f'[metrics]\nlisten = "127.0.0.1:{metrics}"')
    async with daemon(config) as proc:
        done = mailproxy("health", "--config", str(config))
        assert done.returncode == 0 and done.stdout == "ok\n"
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
    assert proc.returncode == 0
    done = mailproxy("health", "--config", str(config))
    assert done.returncode == 1 and f"127.0.0.1:{metrics}/livez did not answer" in done.stderr


# -- check ----------------------------------------------------------------------------------


class _Refusing(socketserver.StreamRequestHandler):
    """An SMTP server (implicit TLS) that offers XOAUTH2 and answers like a Microsoft 365
    tenant with SMTP AUTH turned off."""

    def handle(self) -> None:
        self.wfile.write(b"220 fake.example ESMTP\r\n")
        for line in self.rfile:
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb in (b"EHLO", b"HELO"):
                self.wfile.write(b"250-fake.example\r\n250 AUTH XOAUTH2 OAUTHBEARER\r\n")
            elif verb == b"AUTH":
                self.wfile.write(b"334 \r\n")
                self.rfile.readline()
                self.wfile.write(b"535 5.7.139 Authentication unsuccessful, "
                                 b"SmtpClientAuthentication is disabled for the Tenant.\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"502 5.5.1 no\r\n")


class _TlsServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Refusing)
        self.context = context

    def get_request(self) -> tuple[socket.socket, object]:
        sock, addr = super().get_request()
        return self.context.wrap_socket(sock, server_side=True), addr


@pytest.fixture
def refusing_smtp(test_ca: TestCA) -> Iterator[int]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(test_ca.server_cert, test_ca.server_key)
    server = _TlsServer(context)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_check_passes_for_a_good_account(tmp_path: Path, token_server: TokenServer,
                                         dovecot: Dovecot, mail_user: str) -> None:
    config = write_config(tmp_path, token_server, dovecot, mail_user)
    provision(config, token_server, mail_user)
    done = mailproxy("check", mail_user, "--config", str(config), stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"OK   imap login: logged in at {dovecot.host}:{dovecot.imaps_port}" in done.stdout
    assert "OK   token: refreshed" in done.stdout
    assert "FAIL" not in done.stdout


def test_check_explains_a_revoked_refresh_token(tmp_path: Path, token_server: TokenServer,
                                                dovecot: Dovecot, mail_user: str) -> None:
    config = write_config(tmp_path, token_server, dovecot, mail_user)
    token_server.authority.revoke_refresh_token(provision(config, token_server, mail_user))
    done = mailproxy("check", "--json", "--config", str(config), stdin=PASSWORD + "\n")
    assert done.returncode == 1
    import json

    [report] = json.loads(done.stdout)
    assert not report["ok"]
    token = report["steps"][-1]
    assert token["step"] == "token" and not token["ok"]
    assert "invalid_grant" in token["text"]
    assert f"Fix: the refresh token was revoked or has expired; sign in again with " \
           f"`mailproxy authorize {mail_user}`" in token["text"]


def test_check_explains_smtp_auth_disabled_and_an_unreachable_server(
        tmp_path: Path, token_server: TokenServer, dovecot: Dovecot, mail_user: str,
        refusing_smtp: int, test_ca: TestCA) -> None:
    config = write_config(tmp_path, token_server, dovecot, mail_user,
                          account=f'smtp_server = "127.0.0.1:{refusing_smtp}"\n'
                                  'smtp_tls = "implicit"\n'
                                  f'pop3_server = "127.0.0.1:{free_port()}"\n'
                                  'pop3_tls = "implicit"')
    provision(config, token_server, mail_user)
    done = mailproxy("check", mail_user, "--config", str(config), stdin=PASSWORD + "\n")
    assert done.returncode == 1, done.stdout
    lines = done.stdout.splitlines()
    assert any(line.startswith("  OK   imap login") for line in lines), done.stdout
    [pop3] = [line for line in lines if "pop3 login" in line]
    assert pop3.startswith("  FAIL pop3 login: cannot reach 127.0.0.1:")
    assert "connection refused" in pop3
    [smtp] = [line for line in lines if "smtp login" in line]
    assert smtp.startswith("  FAIL smtp login:") and "535 5.7.139" in smtp
    assert "Set-TransportConfig -SmtpClientAuthenticationDisabled $false" in smtp
    assert "Set-CASMailbox -Identity <address> -SmtpClientAuthenticationDisabled $false" in smtp
