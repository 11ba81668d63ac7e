"""Local TLS end to end, IMAP and POP3: real clients (imaplib, poplib, openssl s_client, curl)
over STARTTLS/STLS and the implicit-TLS listeners, trusting the CA from ``tls export-ca``,
through the proxy to the real Dovecot. require_tls, STARTTLS injection, old TLS versions (refused
with the TLS alert), reload of the TLS listeners and settings."""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import shutil
import socket
import ssl
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from proxy.config import Settings
from proxy.tls.show import export_ca
from tests.integration.conftest import _require
from tests.integration.test_service import Loader, running
from tests.support.dovecot import Dovecot
from tests.support.proxyrun import ProxyHarness
from tests.support.servers import free_port
from tests.support.tokenserver import TokenServer

T = TypeVar("T")
PASSWORD = "plain ascii pw"  # imaplib and curl send ASCII only
MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: Bob <bob@example.test>\r\n"
           b"Subject: over TLS\r\nMessage-ID: <tls1@example.test>\r\n\r\n"
           + b"".join(b"line %06d of a message read over local TLS\r\n" % i
                      for i in range(20000)) + b".leading dot\r\n")


@pytest.fixture
def harness(tmp_path: Path, token_server: TokenServer, dovecot: Dovecot) -> ProxyHarness:
    return ProxyHarness(tmp_path / "state", token_server, dovecot)


def trust(settings: Settings, tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """The CA as ``mailproxy tls export-ca`` prints it, and a client context trusting it."""
    ca = tmp_path / "mailproxy-ca.pem"
    ca.write_text(export_ca(settings))
    return ca, ssl.create_default_context(cafile=str(ca))


async def blocking(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


def setup(harness: ProxyHarness, user: str, **listener: Any) -> Settings:
    harness.provision(user, PASSWORD)
    harness.dovecot.deliver(user, MESSAGE)
    settings = harness.settings(harness.account(user))
    for proto in ("imap", "pop3"):
        for key, value in listener.items():
            setattr(getattr(settings, proto), key, value)
    return settings


# -- IMAP -------------------------------------------------------------------------------------


def imap_starttls_session(port: int, context: ssl.SSLContext, user: str) -> tuple[Any, ...]:
    with imaplib.IMAP4("127.0.0.1", port) as imap:
        before = imap.capabilities
        imap.starttls(context)
        after = imap.capabilities
        imap.login(user, PASSWORD)
        imap.select("INBOX")
        _, data = imap.fetch("1", "(BODY.PEEK[])")
        return before, after, data[0][1]  # type: ignore[index]


def imap_ssl_session(port: int, context: ssl.SSLContext, user: str) -> bytes:
    with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context) as imap:
        imap.login(user, PASSWORD)
        imap.select("INBOX")
        _, data = imap.fetch("1", "(BODY.PEEK[])")
        return data[0][1]  # type: ignore[index,no-any-return]


async def test_imaplib_starttls_and_implicit_tls_byte_identical(
        harness: ProxyHarness, mail_user: str, tmp_path: Path) -> None:
    settings = setup(harness, mail_user)
    async with harness.run(settings) as daemon:
        _, context = trust(settings, tmp_path)
        before, after, body = await blocking(
            imap_starttls_session, daemon.address("imap")[1], context, mail_user)
        assert "STARTTLS" in before and "AUTH=PLAIN" in before  # loopback: not required
        assert "LOGINDISABLED" not in before
        assert "STARTTLS" not in after and "AUTH=PLAIN" in after
        assert body == MESSAGE
        assert await blocking(imap_ssl_session, daemon.address("imaps")[1], context,
                              mail_user) == MESSAGE


def imap_required(port: int, context: ssl.SSLContext, user: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with imaplib.IMAP4("127.0.0.1", port) as imap:
        out["before"] = imap.capabilities
        for attempt in ("login", "authenticate"):
            try:
                if attempt == "login":
                    imap.login(user, PASSWORD)
                else:
                    imap.authenticate("PLAIN", lambda _: f"\0{user}\0{PASSWORD}".encode())
            except imaplib.IMAP4.error as exc:
                out[attempt] = str(exc)
        imap.starttls(context)
        out["after"] = imap.capabilities
        out["login"] += " | " + imap.login(user, PASSWORD)[0]
    return out


async def test_imap_require_tls_refuses_passwords_in_the_clear(
        harness: ProxyHarness, mail_user: str, tmp_path: Path) -> None:
    settings = setup(harness, mail_user, require_tls=True)  # on loopback too
    async with harness.run(settings) as daemon:
        _, context = trust(settings, tmp_path)
        out = await blocking(imap_required, daemon.address("imap")[1], context, mail_user)
    assert "LOGINDISABLED" in out["before"] and "STARTTLS" in out["before"]
    assert not any(c.startswith("AUTH=") for c in out["before"])
    assert "[PRIVACYREQUIRED]" in out["authenticate"]
    assert "[PRIVACYREQUIRED]" in out["login"] and out["login"].endswith("| OK")
    assert "LOGINDISABLED" not in out["after"] and "AUTH=PLAIN" in out["after"]


def raw_injection(port: int, context: ssl.SSLContext, first: bytes, injected: bytes,
                  after: bytes) -> tuple[bytes, bytes]:
    """Send ``first`` and ``injected`` in one segment, do the handshake when the go-ahead
    comes, send ``after`` under TLS; return what came in the clear and under TLS."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        clear = sock.recv(4096)  # greeting
        sock.sendall(first + injected)
        clear += sock.recv(4096)
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(after)
            tls.settimeout(10)
            secure = b""
            while not secure.endswith(b"\r\n"):
                chunk = tls.recv(4096)
                if not chunk:
                    break
                secure += chunk
    return clear, secure


async def test_imap_starttls_injection_never_logs_in(
        harness: ProxyHarness, mail_user: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    settings = setup(harness, mail_user)
    async with harness.run(settings) as daemon:
        _, context = trust(settings, tmp_path)
        clear, secure = await blocking(
            raw_injection, daemon.address("imap")[1], context, b"a STARTTLS\r\n",
            f'b LOGIN {mail_user} "{PASSWORD}"\r\n'.encode(), b"c SELECT INBOX\r\n")
    assert clear.endswith(b"a OK Begin TLS negotiation now\r\n")
    # The pipelined LOGIN was dropped: nobody is logged in, SELECT is refused before login.
    assert secure.startswith(b"c BAD SELECT is not accepted before login")
    assert b"b OK" not in clear + secure
    assert "after STARTTLS" in caplog.text  # logged as a possible injection


async def run_tool(*argv: str, stdin: bytes = b"", timeout: float = 30) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return proc.returncode, out


async def test_openssl_s_client_starttls_and_implicit(
        harness: ProxyHarness, mail_user: str, tmp_path: Path) -> None:
    _require(shutil.which("openssl") is not None, "openssl is not installed")
    settings = setup(harness, mail_user)
    async with harness.run(settings) as daemon:
        ca, _ = trust(settings, tmp_path)
        script = f'a LOGIN {mail_user} "{PASSWORD}"\r\nb LOGOUT\r\n'.encode()
        for extra, proto in ((["-starttls", "imap"], "imap"), ([], "imaps")):
            code, out = await run_tool(
                "openssl", "s_client", "-connect", f"127.0.0.1:{daemon.address(proto)[1]}",
                *extra, "-CAfile", str(ca), "-verify_return_error", "-verify_hostname",
                "localhost", "-ign_eof", stdin=script)
            assert code == 0 and b"Verify return code: 0 (ok)" in out, out
            assert b"a OK" in out and b"b OK" in out, out
        pop = f"USER {mail_user}\r\nPASS {PASSWORD}\r\nSTAT\r\nQUIT\r\n".encode()
        for extra, proto in ((["-starttls", "pop3"], "pop3"), ([], "pop3s")):
            code, out = await run_tool(
                "openssl", "s_client", "-connect", f"127.0.0.1:{daemon.address(proto)[1]}",
                *extra, "-CAfile", str(ca), "-verify_return_error", "-ign_eof", stdin=pop)
            assert code == 0 and b"Verify return code: 0 (ok)" in out, out
            assert b"+OK 1 " in out, out


async def test_curl_imaps_pop3s_and_starttls(
        harness: ProxyHarness, mail_user: str, tmp_path: Path) -> None:
    _require(shutil.which("curl") is not None, "curl is not installed")
    settings = setup(harness, mail_user)
    async with harness.run(settings) as daemon:
        ca, _ = trust(settings, tmp_path)
        user = f"{mail_user}:{PASSWORD}"
        urls = [
            (f"imaps://localhost:{daemon.address('imaps')[1]}/INBOX;UID=1", []),
            (f"imap://localhost:{daemon.address('imap')[1]}/INBOX;UID=1", ["--ssl-reqd"]),
            (f"pop3s://localhost:{daemon.address('pop3s')[1]}/1", []),
            (f"pop3://localhost:{daemon.address('pop3')[1]}/1", ["--ssl-reqd"]),
        ]
        for url, extra in urls:
            code, out = await run_tool("curl", "-sS", "--cacert", str(ca), "--user", user,
                                       *extra, url)
            assert code == 0, out
            assert out == MESSAGE, (url, out[:200])


# -- POP3 -------------------------------------------------------------------------------------


def pop3_stls(port: int, context: ssl.SSLContext, user: str) -> tuple[Any, ...]:
    pop = poplib.POP3("127.0.0.1", port)
    try:
        before = pop.capa()
        pop.stls(context)
        after = pop.capa()
        pop.user(user)
        pop.pass_(PASSWORD)
        _, lines, _ = pop.retr(1)
        return before, after, b"\r\n".join(lines) + b"\r\n"
    finally:
        pop.quit()


def pop3_ssl(port: int, context: ssl.SSLContext, user: str) -> bytes:
    pop = poplib.POP3_SSL("127.0.0.1", port, context=context)
    try:
        pop.user(user)
        pop.pass_(PASSWORD)
        _, lines, _ = pop.retr(1)
        return b"\r\n".join(lines) + b"\r\n"
    finally:
        pop.quit()


async def test_poplib_stls_and_implicit_tls_byte_identical(
        harness: ProxyHarness, mail_user: str, tmp_path: Path) -> None:
    settings = setup(harness, mail_user)
    async with harness.run(settings) as daemon:
        _, context = trust(settings, tmp_path)
        before, after, body = await blocking(pop3_stls, daemon.address("pop3")[1], context,
                                             mail_user)
        assert "STLS" in before and "USER" in before
        assert "STLS" not in after
        # poplib undoes dot-stuffing and splits lines: compare the message as lines.
        assert body == MESSAGE
        assert await blocking(pop3_ssl, daemon.address("pop3s")[1], context,
                              mail_user) == MESSAGE


def pop3_required(port: int, context: ssl.SSLContext, user: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pop = poplib.POP3("127.0.0.1", port)
    try:
        out["before"] = pop.capa()
        for name, call in (("user", lambda: pop.user(user)),
                           ("auth", lambda: pop._shortcmd("AUTH PLAIN"))):
            try:
                call()
            except poplib.error_proto as exc:
                out[name] = exc.args[0].decode()
        pop.stls(context)
        pop.user(user)
        out["pass"] = pop.pass_(PASSWORD).decode()
    finally:
        pop.quit()
    return out


async def test_pop3_require_tls_refuses_user_and_auth_in_the_clear(
        harness: ProxyHarness, mail_user: str, tmp_path: Path) -> None:
    settings = setup(harness, mail_user, require_tls=True)
    async with harness.run(settings) as daemon:
        _, context = trust(settings, tmp_path)
        out = await blocking(pop3_required, daemon.address("pop3")[1], context, mail_user)
    assert "STLS" in out["before"] and "USER" not in out["before"]
    assert out["user"].startswith("-ERR") and "STLS" in out["user"]
    assert out["auth"].startswith("-ERR") and "STLS" in out["auth"]
    assert out["pass"].startswith("+OK")


async def test_pop3_stls_injection_never_logs_in(
        harness: ProxyHarness, mail_user: str, tmp_path: Path) -> None:
    settings = setup(harness, mail_user)
    async with harness.run(settings) as daemon:
        _, context = trust(settings, tmp_path)
        clear, secure = await blocking(
            raw_injection, daemon.address("pop3")[1], context, b"STLS\r\n",
            f"USER {mail_user}\r\nPASS {PASSWORD}\r\n".encode(), b"STAT\r\n")
    assert clear.endswith(b"+OK Begin TLS negotiation\r\n")
    assert secure.startswith(b"-ERR STAT is not accepted before login")


# -- old TLS -----------------------------------------------------------------------------------


def tls10_login(port: int, ca: Path, user: str) -> str:
    context = ssl.create_default_context(cafile=str(ca))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context) as imap:
        version = imap.sock.version()  # type: ignore[attr-defined]
        imap.login(user, PASSWORD)
        return str(version)


async def test_tls10_client_refused_by_default_accepted_when_enabled(
        harness: ProxyHarness, mail_user: str, tmp_path: Path) -> None:
    settings = setup(harness, mail_user)
    async with harness.run(settings) as daemon:
        ca, _ = trust(settings, tmp_path)
        # Refused with the TLS alert that says why, not a reset or a bare close.
        with pytest.raises(ssl.SSLError, match="TLSV1_ALERT_PROTOCOL_VERSION"):
            await blocking(tls10_login, daemon.address("imaps")[1], ca, mail_user)
        if shutil.which("openssl"):
            for extra, proto in (([], "imaps"), (["-starttls", "imap"], "imap")):
                code, out = await run_tool(
                    "openssl", "s_client", "-connect",
                    f"127.0.0.1:{daemon.address(proto)[1]}", *extra, "-tls1_1", "-cipher",
                    "DEFAULT@SECLEVEL=0", "-CAfile", str(ca), stdin=b"")
                assert code != 0 and b"alert protocol version" in out, out
                assert b"unexpected eof" not in out and b"reset" not in out, out
    settings.imap.tls_min_version = "1.0"
    async with harness.run(settings) as daemon:
        assert await blocking(tls10_login, daemon.address("imaps")[1], ca,
                              mail_user) == "TLSv1"


# -- a 20 MB message ---------------------------------------------------------------------------


def big_message(size: int) -> bytes:
    head = (b"From: Alice <alice@example.test>\r\nTo: Bob <bob@example.test>\r\n"
            b"Subject: big\r\nMessage-ID: <big@example.test>\r\n\r\n")
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.-\r\n"
    body = (line * (size // len(line) + 1))[:size - len(head) - 2] + b"\r\n"
    return head + body


async def test_20_mb_fetch_and_retr_over_the_tls_listeners(
        harness: ProxyHarness, mail_user: str, tmp_path: Path) -> None:
    big = big_message(20 * 1024 * 1024)
    harness.provision(mail_user, PASSWORD)
    harness.dovecot.deliver(mail_user, big)
    settings = harness.settings(harness.account(mail_user))
    async with harness.run(settings) as daemon:
        _, context = trust(settings, tmp_path)
        assert await blocking(imap_ssl_session, daemon.address("imaps")[1], context,
                              mail_user) == big
        assert await blocking(pop3_ssl, daemon.address("pop3s")[1], context,
                              mail_user) == big


async def test_fetchmail_pop3s_and_stls(harness: ProxyHarness, mail_user: str,
                                        tmp_path: Path) -> None:
    _require(shutil.which("fetchmail") is not None, "fetchmail is not installed")
    settings = setup(harness, mail_user)
    async with harness.run(settings) as daemon:
        ca, _ = trust(settings, tmp_path)
        for name, port, tls in (("pop3s", daemon.address("pop3s")[1], "ssl"),
                                ("stls", daemon.address("pop3")[1], "sslproto tls1.2+")):
            out = tmp_path / f"{name}.mbox"
            rc = tmp_path / f"{name}.fetchmailrc"
            rc.write_text(
                f'poll 127.0.0.1 service {port} protocol POP3 auth password\n'
                f'  user "{mail_user}" password "{PASSWORD}" {tls} sslcertck\n'
                f'  sslcertfile "{ca}" sslcommonname localhost keep fetchall\n'
                f'  mda "/bin/sh -c \'cat >> {out}\'"\n')
            rc.chmod(0o600)
            code, log = await run_tool(
                "fetchmail", "-v", "--nodetach", "--nosyslog", "--idfile", str(tmp_path / "ids"),
                "--pidfile", str(tmp_path / "fetchmail.pid"), "-f", str(rc), timeout=60)
            assert code == 0, log
            assert (b"> STLS" in log) == (name == "stls"), log
            # fetchmail adds its own Received header; the message itself arrives intact.
            assert out.read_bytes().replace(b"\r\n", b"\n").endswith(
                MESSAGE.replace(b"\r\n", b"\n")), log


# -- reload ------------------------------------------------------------------------------------


def plain_capabilities(port: int) -> tuple[str, ...]:
    with imaplib.IMAP4("127.0.0.1", port) as imap:
        return tuple(imap.capabilities)


def smtps_tls10_greeting(port: int, ca: Path) -> str:
    context = ssl.create_default_context(cafile=str(ca))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname="localhost") as tls:
        assert tls.recv(100).startswith(b"220 ")
        return str(tls.version())


async def test_reload_moves_opens_and_closes_tls_listeners_and_applies_tls_settings(
        harness: ProxyHarness, mail_user: str, tmp_path: Path) -> None:
    settings = setup(harness, mail_user)
    settings.smtp.tls_listen = ""
    loader = Loader(settings)
    async with running(settings, loader) as daemon:
        ca, context = trust(settings, tmp_path)
        old_imaps, old_pop3s = daemon.address("imaps"), daemon.address("pop3s")
        # A session on the TLS listener that moves goes on after the reload.
        before = await asyncio.to_thread(imaplib.IMAP4_SSL, "127.0.0.1", old_imaps[1],
                                         ssl_context=context)
        await asyncio.to_thread(before.login, mail_user, PASSWORD)
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
            await blocking(tls10_login, old_imaps[1], ca, mail_user)

        imaps, smtps = free_port(), free_port()
        after = harness.settings(harness.account(mail_user))
        after.imap = after.imap.model_copy(update={
            "tls_listen": f"127.0.0.1:{imaps}", "tls_min_version": "1.0", "require_tls": True})
        after.pop3 = after.pop3.model_copy(update={"tls_listen": ""})
        after.smtp = after.smtp.model_copy(update={
            "tls_listen": f"127.0.0.1:{smtps}", "tls_min_version": "1.0"})
        loader.settings = after
        result = await daemon.reloader.ask()
        assert result["ok"], result
        assert set(result["changes"]) == {
            f"imaps listener moved from 127.0.0.1:0 to 127.0.0.1:{imaps}",
            "pop3s listener on 127.0.0.1:0 closed", f"smtps listener opened on 127.0.0.1:{smtps}",
            "[imap] changed", "[smtp] changed"}

        assert (await asyncio.to_thread(before.noop))[0] == "OK"
        await asyncio.to_thread(before.logout)
        for gone in (old_imaps, old_pop3s):
            with pytest.raises(OSError):
                await asyncio.to_thread(socket.create_connection, gone, 5)
        # New connections: TLS 1.0 accepted (new contexts), passwords only after STARTTLS.
        assert await blocking(tls10_login, imaps, ca, mail_user) == "TLSv1"
        assert await blocking(smtps_tls10_greeting, smtps, ca) == "TLSv1"
        assert "LOGINDISABLED" in await blocking(plain_capabilities, daemon.address("imap")[1])
