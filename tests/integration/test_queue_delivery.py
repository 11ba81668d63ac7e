"""The outbound queue's delivery against the real servers: spool -> worker -> SmtpDeliverer
(the proxy's upstream session, logged in with XOAUTH2 through the gate) -> Postfix -> LMTP
-> Dovecot, with a TCP relay in between that the test cuts."""

# The Postfix fixtures live in test_smtp_proxy.py; imported, their names are parameters here.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from proxy.config import Account, Settings
from proxy.daemon.server import make_gate
from proxy.login import Gate
from proxy.queue import admin
from proxy.queue.deliver import SmtpDeliverer
from proxy.queue.spool import Spool
from proxy.queue.worker import AccountWorker
from tests.integration.test_smtp_proxy import (  # noqa: F401  (fixtures)
    SmtpHarness,
    cutter,
    delivered,
    harness,
    message,
    same_message,
    wait_delivered,
)
from tests.support.cutter import Cutter
from tests.support.dovecot import Dovecot
from tests.support.proxyrun import LOCAL_PASSWORD
from tests.support.tokenserver import TokenServer


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def running(settings: Settings, account: Account, spool: Spool, *,
                  failures: list[str] | None = None) -> AsyncIterator[tuple[AccountWorker, Gate]]:
    gate = make_gate(settings)
    assert await gate.vault.unlock(account.key, LOCAL_PASSWORD)

    async def on_failure(_: Account, reason: str) -> None:
        if failures is not None:
            failures.append(reason)

    worker = AccountWorker(account, spool, SmtpDeliverer(gate), lifetime=86400,
                           max_backoff=3600, on_failure=on_failure, hostname="proxy.test")
    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(worker.run())
            try:
                yield worker, gate
            finally:
                task.cancel()
    finally:
        await gate.tokens.aclose()


async def queue_message(spool: Spool, account: Account, sender: str, rcpts: list[str],
                        stored: bytes) -> str:
    reception = spool.receive(account.key, sender, rcpts)
    for i in range(0, len(stored), 5000):
        await reception.write(stored[i:i + 5000])
    return (await reception.commit()).id


async def test_twenty_messages_queued_while_the_server_is_down_arrive_once(
        harness: SmtpHarness, mail_user: str, cutter: Cutter, tmp_path: Path) -> None:
    harness.provision(mail_user)
    account = harness.smtp_account(mail_user, smtp_port=cutter.port)
    settings = harness.settings(account)
    spool = await Spool.open(tmp_path / "queue")
    cutter.refusing = True
    sent = []
    for i in range(20):
        # Stored dot-stuffed, as received after DATA: ".." arrives as ".".
        body = f"message {i}\r\n..a line with a dot\r\n".encode() \
            + (bytes(range(32, 127)) + b"\r\n") * i * 20
        original = message(mail_user, mail_user, body.replace(b"\r\n..", b"\r\n."),
                           subject=f"queued {i}")
        sent.append(original)
        await queue_message(spool, account, mail_user, [mail_user],
                            original.replace(b"\r\n.", b"\r\n.."))
    try:
        async with running(settings, account, spool) as (worker, _):
            async def all_tried() -> bool:
                return all(r.attempts >= 1 for r in admin.list_messages(spool.directory))
            await until(all_tried)
            assert delivered(harness.dovecot, mail_user) == []
            assert "cannot reach" in (admin.list_messages(spool.directory)[0].last_error or "")
            before = cutter.connections
            cutter.refusing = False
            assert admin.retry(spool.directory, None) == 20  # as `mailproxy queue retry --all`
            found = await wait_delivered(harness.dovecot, mail_user, 20)

            async def empty() -> bool:
                return admin.list_messages(spool.directory) == []
            await until(empty)
            # One logged-in session carried all twenty.
            assert cutter.connections - before == 1
            assert worker.status.delivered == 20
    finally:
        await spool.aclose()
    for original in sent:
        assert sum(same_message(stored, original) for stored in found) == 1


async def test_unknown_recipient_bounces_with_a_dsn_to_the_sender(
        harness: SmtpHarness, mail_user: str, token_server: TokenServer, dovecot: Dovecot,
        tmp_path: Path) -> None:
    harness.provision(mail_user)
    account = harness.smtp_account(mail_user)
    settings = harness.settings(account)
    spool = await Spool.open(tmp_path / "queue")
    original = message(mail_user, "nobody-here@example.test", b"the scan\r\n",
                       subject="Scan 0042")
    failures: list[str] = []
    try:
        await queue_message(spool, account, mail_user, ["nobody-here@example.test"], original)
        async with running(settings, account, spool, failures=failures):
            (report,) = await wait_delivered(harness.dovecot, mail_user, 1)

            async def empty() -> bool:
                return admin.list_messages(spool.directory) == []
            await until(empty)
    finally:
        await spool.aclose()
    parsed = email.message_from_bytes(report, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed["Return-Path"] == "<>"  # sent with the null sender
    _, status, headers = parsed.get_payload()
    fields = status.get_payload()[1]
    assert fields["Final-Recipient"] == "rfc822; nobody-here@example.test"
    assert fields["Action"] == "failed" and fields["Status"] == "5.1.1"
    assert fields["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    assert "Subject: Scan 0042" in headers.get_payload()
    assert "the scan" not in headers.get_payload()
    assert len(failures) == 1 and "nobody-here@example.test" in failures[0]


async def test_a_revoked_token_keeps_messages_queued_until_a_new_one(
        harness: SmtpHarness, mail_user: str, token_server: TokenServer,
        tmp_path: Path) -> None:
    refresh = harness.provision(mail_user)
    account = harness.smtp_account(mail_user)
    settings = harness.settings(account)
    token_server.authority.revoke_refresh_token(refresh)
    spool = await Spool.open(tmp_path / "queue")
    original = message(mail_user, mail_user, b"waited\r\n", subject="after authorization")
    try:
        message_id = await queue_message(spool, account, mail_user, [mail_user], original)
        async with running(settings, account, spool) as (worker, gate):
            async def waiting() -> bool:
                return worker.status.waiting_for is not None
            await until(waiting)
            record = admin.get(spool.directory, message_id)
            assert record.attempts == 0 and "authoriz" in (record.last_error or "")
            await asyncio.sleep(0.5)
            assert delivered(harness.dovecot, mail_user) == []
            # `mailproxy token import`: a new refresh token in the vault.
            harness.provision(mail_user)
            assert await gate.vault.unlock(account.key, LOCAL_PASSWORD)
            (stored,) = await wait_delivered(harness.dovecot, mail_user, 1)
    finally:
        await spool.aclose()
    assert same_message(stored, original)
