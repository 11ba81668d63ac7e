"""Local TLS end to end, SMTP: smtplib with STARTTLS and SMTP_SSL, openssl s_client, curl
smtps://, swaks (--tls, --tlsc) and msmtp (STARTTLS, implicit) trusting the CA from
``tls export-ca``, through the proxy to the real Postfix and into Dovecot. require_tls (no
AUTH before STARTTLS, 530 5.7.0), STARTTLS injection, ``AUTH login``."""

from __future__ import annotations

import asyncio
import base64
import logging
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
                                      tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _require(shutil.which("openssl") is not None, "openssl is not installed")
    caplog.set_level(logging.INFO, logger="mailproxy")
    settings = setup(harness, mail_user)
    body = message(mail_user, mail_user, b"sent by curl over smtps\r\n", "curl")
    async with harness.run(settings) as daemon:
        ca, _ = trust(settings, tmp_path)
        # TLS 1.1 is refused with the alert that says so; a line in the log, no traceback.
        for extra, proto in ((["-starttls", "smtp"], "smtp"), ([], "smtps")):
            code, out = await run_tool(
                "openssl", "s_client", "-connect", f"127.0.0.1:{daemon.address(proto)[1]}",
                *extra, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", "-CAfile", str(ca))
            assert code != 0 and b"alert protocol version" in out, out
        assert "smtp: TLS handshake with 127.0.0.1 failed" in caplog.text
        assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
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


# -- swaks and msmtp ---------------------------------------------------------------------------


async def test_swaks_starttls_and_implicit_tls(harness: SmtpHarness, mail_user: str,
                                               tmp_path: Path) -> None:
    _require(shutil.which("swaks") is not None, "swaks is not installed")
    settings = setup(harness, mail_user)
    bodies = {flag: message(mail_user, mail_user, f"sent by swaks {flag}\r\n".encode(),
                            f"swaks {flag}") for flag in ("--tls", "--tlsc")}
    async with harness.run(settings) as daemon:
        ca, _ = trust(settings, tmp_path)
        for flag, listener in (("--tls", "smtp"), ("--tlsc", "smtps")):
            source = tmp_path / f"swaks{flag}.eml"
            # swaks ends the data with CRLF . CRLF itself: the file has no last line end.
            source.write_bytes(bodies[flag].removesuffix(b"\r\n"))
            code, out = await run_tool(
                "swaks", flag, "--tls-verify", "--tls-ca-path", str(ca), "--tls-sni",
                "localhost", "--server", "127.0.0.1", "--port",
                str(daemon.address(listener)[1]), "--auth", "PLAIN", "--auth-user", mail_user,
                "--auth-password", PASSWORD, "--from", mail_user, "--to", mail_user,
                "--data", f"@{source}", "--helo", "swaks.test")
            assert code == 0, out
            if flag == "--tls":
                assert b"-> STARTTLS" in out and b"<-  220 2.0.0 Ready to start TLS" in out, out
            assert b"TLS started" in out and b"~> AUTH PLAIN" in out, out
            assert b"<~  235" in out and b"<~  250" in out, out
    stored = await wait_delivered(harness.dovecot, mail_user, 2)
    for body in bodies.values():
        assert any(same_message(s, body) for s in stored), body[:120]


async def test_msmtp_starttls_and_implicit_tls(harness: SmtpHarness, mail_user: str,
                                               tmp_path: Path) -> None:
    _require(shutil.which("msmtp") is not None, "msmtp is not installed")
    settings = setup(harness, mail_user)
    modes = {"starttls": ("smtp", "on"), "implicit": ("smtps", "off")}
    bodies = {mode: message(mail_user, mail_user, f"sent by msmtp, {mode}\r\n".encode(),
                            f"msmtp {mode}") for mode in modes}
    async with harness.run(settings) as daemon:
        ca, _ = trust(settings, tmp_path)
        for mode, (listener, starttls) in modes.items():
            rc = tmp_path / f"msmtprc-{mode}"
            rc.write_text(
                f"account default\nhost 127.0.0.1\nport {daemon.address(listener)[1]}\n"
                f"tls on\ntls_starttls {starttls}\ntls_trust_file {ca}\n"
                "tls_host_override localhost\n"
                f"auth plain\nuser {mail_user}\npassword {PASSWORD}\nfrom {mail_user}\n")
            rc.chmod(0o600)  # msmtp refuses a password in a file others can read
            code, out = await run_tool("msmtp", "--debug", "-C", str(rc), mail_user,
                                       stdin=bodies[mode])
            assert code == 0, out
            assert (b"--> STARTTLS" in out) == (mode == "starttls"), out
            assert b"TLS session parameters" in out and b"<-- 235" in out, out
    stored = await wait_delivered(harness.dovecot, mail_user, 2)
    for body in bodies.values():
        assert any(same_message(s, body) for s in stored), body[:120]
