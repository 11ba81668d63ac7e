"""Local TLS end to end, SMTP: smtplib with STARTTLS and SMTP_SSL, openssl s_client and curl
smtps:// trusting the CA from ``tls export-ca``, through the proxy to the real Postfix and into
Dovecot. require_tls (no AUTH before STARTTLS, 530 5.7.0), STARTTLS injection, ``AUTH login``."""

from __future__ import annotations

import asyncio
import base64
import shutil
import smtplib
import socket
import ssl
from pathlib import Path

import pytest

from proxy.config import Settings
from tests.integration.conftest import _require
from tests.integration.test_local_tls import run_tool, trust
from tests.integration.test_smtp_proxy import (
    SmtpHarness,
    message,
    same_message,
    wait_delivered,
)
from tests.support.dovecot import Dovecot
from tests.support.postfix import Postfix
from tests.support.tokenserver import TokenServer

PASSWORD = "plain ascii pw"


@pytest.fixture
def harness(tmp_path: Path, token_server: TokenServer, dovecot: Dovecot,
            postfix: Postfix) -> SmtpHarness:
    postfix.ensure_running()
    h = SmtpHarness(tmp_path / "state", token_server, dovecot)
    h.postfix = postfix
    return h


def setup(harness: SmtpHarness, user: str, **listener: object) -> Settings:
    harness.provision(user, PASSWORD)
    settings = harness.smtp_settings(user)
    for key, value in listener.items():
        setattr(settings.smtp, key, value)
    return settings


def send_starttls(port: int, context: ssl.SSLContext, user: str, body: bytes) -> dict[str, str]:
    with smtplib.SMTP("127.0.0.1", port) as smtp:
        smtp.ehlo()
        before = smtp.esmtp_features.copy()
        smtp.starttls(context=context)
        smtp.ehlo()
        after = smtp.esmtp_features.copy()
        smtp.login(user, PASSWORD)
        smtp.sendmail(user, [user], body)
    return {"before": " ".join(before), "after": " ".join(after)}


def send_ssl(port: int, context: ssl.SSLContext, user: str, body: bytes) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", port, context=context) as smtp:
        smtp.login(user, PASSWORD)
        smtp.sendmail(user, [user], body)


async def test_smtplib_starttls_and_smtp_ssl(harness: SmtpHarness, mail_user: str,
                                            tmp_path: Path) -> None:
    settings = setup(harness, mail_user)
    first = message(mail_user, mail_user, b"over STARTTLS\r\n", "starttls")
    second = message(mail_user, mail_user, b"over implicit TLS\r\n", "smtps")
    async with harness.run(settings) as daemon:
        _, context = trust(settings, tmp_path)
        features = await asyncio.to_thread(send_starttls, daemon.address("smtp")[1], context,
                                           mail_user, first)
        await asyncio.to_thread(send_ssl, daemon.address("smtps")[1], context, mail_user,
                                second)
    # Loopback: TLS offered, not required, so AUTH is listed before STARTTLS too.
    assert "starttls" in features["before"] and "auth" in features["before"]
    assert "starttls" not in features["after"] and "auth" in features["after"]
    stored = await wait_delivered(harness.dovecot, mail_user, 2)
    assert any(same_message(s, first) for s in stored)
    assert any(same_message(s, second) for s in stored)


def required_dialogue(port: int, context: ssl.SSLContext, user: str) -> dict[str, object]:
    out: dict[str, object] = {}
    with smtplib.SMTP("127.0.0.1", port) as smtp:
        smtp.ehlo()
        out["before"] = dict(smtp.esmtp_features)
        blob = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
        out["auth"] = smtp.docmd("AUTH", f"PLAIN {blob}")
        smtp.starttls(context=context)
        smtp.ehlo()
        out["after"] = dict(smtp.esmtp_features)
        # Mechanism names in any case (PowerShell's Send-MailMessage sends "AUTH login").
        out["login"] = smtp.docmd("AUTH", "login")
        out["user"] = smtp.docmd(base64.b64encode(user.encode()).decode())
        out["pass"] = smtp.docmd(base64.b64encode(PASSWORD.encode()).decode())
    return out


async def test_smtp_require_tls_and_lowercase_auth_login(
        harness: SmtpHarness, mail_user: str, tmp_path: Path) -> None:
    settings = setup(harness, mail_user, require_tls=True)
    async with harness.run(settings) as daemon:
        _, context = trust(settings, tmp_path)
        out = await asyncio.to_thread(required_dialogue, daemon.address("smtp")[1], context,
                                      mail_user)
    before, after = out["before"], out["after"]
    assert isinstance(before, dict) and isinstance(after, dict)
    assert "starttls" in before and "auth" not in before
    assert out["auth"] == (530, b"5.7.0 Must issue a STARTTLS command first")
    assert "auth" in after and "starttls" not in after
    assert out["login"] == (334, b"VXNlcm5hbWU6")
    assert out["user"] == (334, b"UGFzc3dvcmQ6")
    assert out["pass"][0] == 235  # type: ignore[index]


def injection(port: int, context: ssl.SSLContext, user: str) -> tuple[bytes, bytes]:
    blob = base64.b64encode(f"\0{user}\0{PASSWORD}".encode())
    with socket.create_connection(("127.0.0.1", port)) as sock:
        f = sock.makefile("rb")
        clear = f.readline()
        sock.sendall(b"EHLO x\r\n")
        while not (line := f.readline()).startswith(b"250 "):
            clear += line
        sock.sendall(b"STARTTLS\r\nAUTH PLAIN " + blob + b"\r\n")
        clear += f.readline()
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.settimeout(10)
            g = tls.makefile("rb")
            tls.sendall(b"EHLO x\r\n")
            while not g.readline().startswith(b"250 "):
                pass
            tls.sendall(b"MAIL FROM:<" + user.encode() + b">\r\n")
            secure = g.readline()
    return clear, secure


async def test_smtp_starttls_injection_never_authenticates(
        harness: SmtpHarness, mail_user: str, tmp_path: Path) -> None:
    settings = setup(harness, mail_user)
    async with harness.run(settings) as daemon:
        _, context = trust(settings, tmp_path)
        clear, secure = await asyncio.to_thread(injection, daemon.address("smtp")[1],
                                                context, mail_user)
    assert clear.endswith(b"220 2.0.0 Ready to start TLS\r\n")
    # The pipelined AUTH was discarded: under TLS the session starts over, unauthenticated.
    assert secure == b"530 5.7.0 Authentication required\r\n"


async def test_openssl_and_curl_smtps(harness: SmtpHarness, mail_user: str,
                                      tmp_path: Path) -> None:
    _require(shutil.which("openssl") is not None, "openssl is not installed")
    settings = setup(harness, mail_user)
    body = message(mail_user, mail_user, b"sent by curl over smtps\r\n", "curl")
    async with harness.run(settings) as daemon:
        ca, _ = trust(settings, tmp_path)
        code, out = await run_tool(
            "openssl", "s_client", "-connect", f"127.0.0.1:{daemon.address('smtp')[1]}",
            "-starttls", "smtp", "-CAfile", str(ca), "-verify_return_error", "-ign_eof",
            stdin=b"EHLO x\r\nQUIT\r\n")
        assert code == 0 and b"Verify return code: 0 (ok)" in out, out
        assert b"250-AUTH" in out or b"250 AUTH" in out, out
        if shutil.which("curl"):
            source = tmp_path / "mail.eml"
            source.write_bytes(body)
            code, out = await run_tool(
                "curl", "-sS", "--cacert", str(ca), "--user", f"{mail_user}:{PASSWORD}",
                "--mail-from", mail_user, "--mail-rcpt", mail_user, "--upload-file",
                str(source), f"smtps://localhost:{daemon.address('smtps')[1]}")
            assert code == 0, out
    if shutil.which("curl"):
        stored = await wait_delivered(harness.dovecot, mail_user, 1)
        assert same_message(stored[0], body)


async def test_20_mb_message_over_smtps(harness: SmtpHarness, mail_user: str,
                                        tmp_path: Path) -> None:
    settings = setup(harness, mail_user)
    line = (b"0123456789abcdefghijklmnopqrstuvwxyz" * 2)[:76] + b"\r\n"
    sent = message(mail_user, mail_user, line * (20 * 1024 * 1024 // len(line)), "big")
    async with harness.run(settings) as daemon:
        _, context = trust(settings, tmp_path)
        await asyncio.to_thread(send_ssl, daemon.address("smtps")[1], context, mail_user, sent)
    (stored,) = await wait_delivered(harness.dovecot, mail_user, 1, timeout=60)
    assert same_message(stored, sent)
