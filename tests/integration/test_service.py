"""Running as a service, in process against the real servers: reload (accounts, listeners, a
refused configuration, SIGHUP during a rotating refresh), the systemd notifications and the
Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import MetricsSettings, Settings
from proxy.daemon.server import Daemon
from proxy.tokens.store import TokenState
from proxy.vault import Vault
from tests.support.dovecot import Dovecot
from tests.support.imapclient import RawImap, tagged_status
from tests.support.postfix import Postfix
from tests.support.proxyrun import LOCAL_PASSWORD, ProxyHarness
from tests.support.servers import free_port
from tests.support.tokenserver import TEST_CLIENT_ID, TokenServer


@pytest.fixture
def harness(tmp_path: Path, token_server: TokenServer, dovecot: Dovecot) -> ProxyHarness:
    return ProxyHarness(tmp_path / "state", token_server, dovecot)


class Loader:
    """What the daemon reads at a reload: ``settings``, or ``error`` raised."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __call__(self) -> Settings:
        return self.settings


@contextlib.asynccontextmanager
async def running(settings: Settings, loader: Loader | None = None,
                  env: Mapping[str, str] | None = None) -> AsyncIterator[Daemon]:
    daemon = Daemon(settings, loader=loader, env=env or {})
    task = asyncio.create_task(daemon.run())
    ready = asyncio.create_task(daemon.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()
    try:
        yield daemon
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 30)


async def append(client: RawImap, subject: str) -> None:
    """A message stored through the session (LITERAL+: no continuation to wait for)."""
    message = f"From: a@example.test\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()
    reply = await client.command(b"APPEND INBOX {%d+}\r\n" % len(message) + message)
    assert b" OK" in tagged_status(reply), reply


async def imap_login(address: tuple[str, int], user: str,
                     password: str = LOCAL_PASSWORD) -> tuple[RawImap, bytes]:
    client = await RawImap.connect(*address)
    return client, tagged_status(await client.login(user, password))


async def test_reload_adds_an_account_while_a_session_of_another_goes_on(
        harness: ProxyHarness, token_server: TokenServer) -> None:
    first, second = (f"u{secrets.token_hex(6)}@example.test" for _ in range(2))
    harness.provision(first)
    harness.provision(second)
    before = harness.settings(harness.account(first))
    loader = Loader(before)
    async with running(before, loader) as daemon:
        client, status = await imap_login(daemon.address("imap"), first)
        assert status.startswith(b"t1 OK"), status
        await append(client, "before the reload")
        assert tagged_status(await client.command("SELECT INBOX")).startswith(b"t3 OK")
        fetched = await client.command("FETCH 1 BODY[HEADER.FIELDS (SUBJECT)]")
        assert b"before the reload" in fetched and tagged_status(fetched).startswith(b"t4 OK")
        refreshes = len(token_server.authority.requests_for("refresh_token"))
        expires = daemon.gate.tokens.status(first.casefold())["expires_at"]

        # Refused before the reload: the account is not configured yet.
        other, status = await imap_login(daemon.address("imap"), second)
        assert status.startswith(b"t1 NO"), status
        await other.close()

        loader.settings = harness.settings(harness.account(first), harness.account(second))
        result = await daemon.reloader.ask()
        assert result == {"ok": True, "changes": [f"account {second} added"]}

        # The session in flight goes on, through the same upstream connection.
        fetched = await client.command("FETCH 1 BODY[HEADER.FIELDS (SUBJECT)]")
        assert b"before the reload" in fetched and tagged_status(fetched).startswith(b"t5 OK")
        # The unchanged account kept its vault key, its token and its schedule.
        assert daemon.gate.vault.is_open(first.casefold())
        assert daemon.gate.tokens.status(first.casefold())["expires_at"] == expires
        assert len(token_server.authority.requests_for("refresh_token")) == refreshes

        other, status = await imap_login(daemon.address("imap"), second)
        assert status.startswith(b"t1 OK"), status
        await other.close()
        await client.close()


async def test_reload_removes_an_account_and_moves_a_listener(harness: ProxyHarness) -> None:
    first, second = (f"u{secrets.token_hex(6)}@example.test" for _ in range(2))
    harness.provision(first)
    harness.provision(second)
    before = harness.settings(harness.account(first), harness.account(second))
    loader = Loader(before)
    async with running(before, loader) as daemon:
        old = daemon.address("imap")
        client, status = await imap_login(old, second)
        assert status.startswith(b"t1 OK")
        port = free_port()
        after = harness.settings(harness.account(first))
        after.imap = after.imap.model_copy(update={"listen": f"127.0.0.1:{port}"})
        loader.settings = after
        result = await daemon.reloader.ask()
        assert result["ok"], result
        assert set(result["changes"]) == {
            f"imap listener moved from 127.0.0.1:0 to 127.0.0.1:{port}",
            f"account {second} removed"}
        assert daemon.address("imap") == ("127.0.0.1", port)
        with pytest.raises(OSError):
            await RawImap.connect(*old)
        # The session accepted on the old listener goes on.
        assert tagged_status(await client.command("NOOP")).startswith(b"t2 OK")
        await client.close()
        moved, status = await imap_login(("127.0.0.1", port), first)
        assert status.startswith(b"t1 OK"), status
        await moved.close()
        gone, status = await imap_login(("127.0.0.1", port), second)
        assert status.startswith(b"t1 NO"), status
        await gone.close()


async def test_reload_that_cannot_apply_is_refused_and_the_old_one_serves(
        harness: ProxyHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    before = harness.settings(harness.account(mail_user))
    loader = Loader(before)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        async with running(before, loader) as daemon:
            address = daemon.address("imap")
            broken = harness.settings(harness.account(mail_user))
            broken.imap = broken.imap.model_copy(
                update={"listen": f"127.0.0.1:{taken.getsockname()[1]}"})
            broken.accounts = []
            loader.settings = broken
            result = await daemon.reloader.ask()
            assert not result["ok"] and "in use" in result["error"], result
            assert daemon.address("imap") == address
            assert daemon.settings is before
            client, status = await imap_login(address, mail_user)
            assert status.startswith(b"t1 OK"), status
            await client.close()
    finally:
        taken.close()


async def test_sighup_during_a_rotating_refresh_loses_nothing(
        harness: ProxyHarness, token_server: TokenServer, mail_user: str) -> None:
    authority = token_server.authority
    authority.rotate_refresh_tokens = True
    authority.token_delay = 1.0
    original = harness.provision(mail_user)
    before = harness.settings(harness.account(mail_user))
    loader = Loader(harness.settings(harness.account(mail_user, smtp_max_recipients=7)))
    loop = asyncio.get_running_loop()
    async with running(before, loader) as daemon:
        loop.add_signal_handler(signal.SIGHUP, daemon.reloader.request)
        try:
            login = asyncio.create_task(imap_login(daemon.address("imap"), mail_user))
            while not daemon.gate.tokens.source.refreshing(mail_user.casefold()):
                await asyncio.sleep(0.01)
            os.kill(os.getpid(), signal.SIGHUP)  # the account changes while its request flies
            client, status = await login
            assert status.startswith(b"t1 OK"), status
            result = await daemon.reloader.ask()  # after the SIGHUP's reload
            assert result["ok"], result
            assert daemon.settings.accounts[0].smtp_max_recipients == 7
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
        await client.close()
        # The rotated refresh token reached the vault: it still works, the old one is dead.
        state = harness.store(mail_user).load(mail_user.casefold())
        assert state.refresh_token and state.refresh_token != original
        token = await daemon.gate.tokens.get_token(mail_user.casefold(), force_refresh=True)
        assert token.fresh
    assert len(authority.requests_for("refresh_token")) == 2


def _datagrams(sock: socket.socket) -> list[str]:
    out = []
    with contextlib.suppress(BlockingIOError):
        while True:
            out.append(sock.recv(4096).decode())
    return out


async def test_systemd_notifications_arrive_in_order(harness: ProxyHarness,
                                                     mail_user: str) -> None:
    harness.provision(mail_user)
    name = f"mailproxy-test-{secrets.token_hex(6)}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(b"\0" + name.encode())
    listener.setblocking(False)
    settings = harness.settings(harness.account(mail_user))
    env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "200000"}  # a ping every 0.1 s
    messages: list[str] = []

    def kinds_so_far() -> list[str]:
        kinds = []
        for message in messages:
            fields = dict(line.split("=", 1) for line in message.split("\n"))
            for kind in ("READY", "RELOADING", "STOPPING", "WATCHDOG"):
                if kind in fields:
                    assert fields[kind] == "1"
                    kinds.append(kind)
            if "RELOADING" in fields:
                now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                assert 0 < now - int(fields["MONOTONIC_USEC"]) < 10_000_000
        return kinds

    async def until(done: Callable[[list[str]], bool]) -> None:
        """Collect datagrams until ``done(kinds)``: 3 s at most, far more than pings every
        0.1 s need, yet short of the 5 s STATUS interval (a notifier that pinged only with
        STATUS would fail here)."""
        async with asyncio.timeout(3):
            while not done(kinds_so_far()):
                await asyncio.sleep(0.02)
                messages.extend(_datagrams(listener))

    try:
        async with running(settings, Loader(settings), env) as daemon:
            await until(lambda kinds: kinds.count("WATCHDOG") >= 2)
            assert (await daemon.reloader.ask())["ok"]
            await until(lambda kinds: "RELOADING" in kinds
                        and "WATCHDOG" in kinds[kinds.index("RELOADING"):])
        messages.extend(_datagrams(listener))
    finally:
        listener.close()
    kinds = kinds_so_far()
    assert kinds[0] == "READY" and kinds[-1] == "STOPPING"
    events = [k for k in kinds if k != "WATCHDOG"]
    assert events == ["READY", "RELOADING", "READY", "STOPPING"]
    reload_at = kinds.index("RELOADING")
    assert kinds[1:reload_at].count("WATCHDOG") >= 2
    assert "WATCHDOG" in kinds[reload_at:]
    assert any(m.startswith("READY=1") and "STATUS=0 sessions; 1 account, all authorized" in m
               for m in messages)


async def test_metrics_count_a_scripted_series(harness: ProxyHarness, dovecot: Dovecot,
                                               postfix: Postfix,
                                               token_server: TokenServer) -> None:
    postfix.ensure_running()
    good, revoked = (f"u{secrets.token_hex(6)}@example.test" for _ in range(2))
    harness.provision(good)
    dead = token_server.authority.issue_refresh_token(revoked, TEST_CLIENT_ID)
    Vault(harness.state_dir).create(revoked.casefold(), password=LOCAL_PASSWORD,
                                    state=TokenState(refresh_token=dead))
    token_server.authority.revoke_refresh_token(dead)
    settings = harness.settings(
        harness.account(good, smtp_server=f"{postfix.host}:{postfix.smtps_port}",
                        smtp_tls="implicit"),
        harness.account(revoked))
    settings.metrics = MetricsSettings(listen="127.0.0.1:0")
    async with running(settings, Loader(settings)) as daemon:
        imap = daemon.address("imap")
        for password in (LOCAL_PASSWORD, LOCAL_PASSWORD, "wrong", "also wrong"):
            client, status = await imap_login(imap, good, password)
            assert status.startswith(b"t1 OK" if password == LOCAL_PASSWORD else b"t1 NO")
            if password == LOCAL_PASSWORD:
                assert tagged_status(await client.command("SELECT INBOX")).startswith(b"t2 OK")
            await client.close()
        client, status = await imap_login(imap, revoked)
        assert status.startswith(b"t1 NO"), status
        await client.close()
        import aiosmtplib

        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.address("smtp")[1],
                               use_tls=False, start_tls=False, timeout=30)
        await smtp.connect()
        await smtp.login(good, LOCAL_PASSWORD)
        await smtp.sendmail(good, [good], f"From: {good}\r\nTo: {good}\r\nSubject: m\r\n\r\n"
                            "one message\r\n")
        await smtp.quit()
        async with asyncio.timeout(10):  # the spare made after the second IMAP login
            while not daemon.spares.pool.idle(good.casefold()):
                await asyncio.sleep(0.02)
        assert daemon.metrics_server.address is not None
        host, port = daemon.metrics_server.address
        async with httpx.AsyncClient() as http:
            for _ in range(50):  # the session gauge falls as the closes arrive
                text = (await http.get(f"http://{host}:{port}/metrics")).text
                samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                           for family in text_string_to_metric_families(text)
                           for s in family.samples}
                if all(v == 0 for (n, _), v in samples.items() if n == "mailproxy_sessions"):
                    break
                await asyncio.sleep(0.1)
            assert (await http.get(f"http://{host}:{port}/livez")).status_code == 200
            assert (await http.get(f"http://{host}:{port}/readyz")).status_code == 200

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in samples.items()
                   if n == name and labels.items() <= dict(ls).items())

    assert value("mailproxy_logins_total", protocol="imap", result="ok") == 2
    assert value("mailproxy_logins_total", protocol="smtp", result="ok") == 1
    assert value("mailproxy_logins_total", protocol="imap", result="credentials") == 2
    assert value("mailproxy_logins_total", protocol="imap", result="authorization") == 1
    assert total("mailproxy_logins_total") == 6, {k: v for k, v in samples.items()
                                                  if k[0] == "mailproxy_logins_total"}
    assert total("mailproxy_login_duration_seconds_count") == 6
    assert value("mailproxy_smtp_messages_total", result="accepted") == 1
    assert total("mailproxy_smtp_messages_total") == 1
    assert value("mailproxy_token_requests_total", account=good, grant="refresh_token",
                 result="ok") == 1
    assert value("mailproxy_token_requests_total", account=revoked, grant="refresh_token",
                 result="permanent") == 1
    # The first IMAP login's own, the spare made after it (the second login's), and the next.
    assert total("mailproxy_upstream_auth_total", protocol="imap", result="ok") == 3
    assert total("mailproxy_upstream_auth_total", protocol="smtp", result="ok") == 1
    assert total("mailproxy_upstream_auth_total") == 4
    # Misses: the first login of each account (the revoked one's then fails); wrong
    # passwords never look.
    assert value("mailproxy_upstream_spare_total", protocol="imap", result="miss") == 2
    assert value("mailproxy_upstream_spare_total", protocol="imap", result="hit") == 1
    assert total("mailproxy_upstream_spare_total") == 3
    assert value("mailproxy_account_authorized", account=good) == 1
    assert value("mailproxy_account_authorized", account=revoked) == 0
    assert value("mailproxy_token_expiry_timestamp_seconds", account=good) > time.time()
    assert value("mailproxy_relayed_bytes_total", protocol="imap", direction="in") > 0
    assert value("mailproxy_relayed_bytes_total", protocol="imap", direction="out") > 0
    assert total("mailproxy_sessions") == 0
    assert total("mailproxy_build_info") == 1
    if sys.platform.startswith("linux"):  # prometheus_client's process collector: /proc
        assert value("process_resident_memory_bytes") > 10 * 2**20
        assert 0 < value("process_open_fds") <= value("process_max_fds")


async def test_stop_gives_sessions_their_grace_and_lets_a_token_request_finish(
        harness: ProxyHarness, token_server: TokenServer) -> None:
    authority = token_server.authority
    idle, late = (f"u{secrets.token_hex(6)}@example.test" for _ in range(2))
    harness.provision(idle)
    original = harness.provision(late)
    settings = harness.settings(harness.account(idle), harness.account(late))
    settings.shutdown_grace = 1.0
    async with running(settings, Loader(settings)) as daemon:
        client, status = await imap_login(daemon.address("imap"), idle)
        assert status.startswith(b"t1 OK")
        authority.rotate_refresh_tokens = True
        authority.token_delay = 2.0  # longer than the grace
        login = asyncio.create_task(imap_login(daemon.address("imap"), late))
        while not daemon.gate.tokens.source.refreshing(late.casefold()):
            await asyncio.sleep(0.01)
        address = daemon.address("imap")
        started = time.monotonic()
        daemon.stop()
        await asyncio.sleep(0.1)
        with pytest.raises(OSError):  # no new connections once stopping
            await RawImap.connect(*address)
    took = time.monotonic() - started
    # The idle session was cut after its grace; the token request was let finish.
    assert 1.9 < took < 10, took
    with contextlib.suppress(Exception):
        await client.close()
    login.cancel()
    await asyncio.gather(login, return_exceptions=True)
    state = harness.store(late).load(late.casefold())
    assert state.refresh_token and state.refresh_token != original  # the rotation was saved
    assert authority.requests_for("refresh_token")[-1][1] == late
