"""The delivery worker on a fake upstream and a fake clock: order, session reuse, back-off,
lifetime, partial failure, DSNs, authorization, rate limits, retries from the CLI."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.config import Account
from proxy.queue import admin
from proxy.queue.ratelimit import Limits
from proxy.queue.spool import Spool
from proxy.queue.upstream import Attempt, Reply, SessionLost, SessionRefused
from proxy.queue.worker import POLL, AccountWorker, backoff
from tests.support.clock import ManualClock as Clock

ACCOUNT = Account(address="Office@example.com", provider="custom", client_id="c",
                  token_url="http://127.0.0.1:1/token", scopes=[],
                  smtp_server="127.0.0.1:2525")
KEY = ACCOUNT.key
OK = Reply(250, "2.0.0 Ok")


@dataclass
class Server:
    """What the fake upstream answers, and what it saw."""

    mail: Reply = OK
    rcpt: dict[str, Reply] = field(default_factory=dict)  # default 250
    data: Reply = OK
    lose_during_send: int = 0  # this many sends break the connection
    refuse: SessionRefused | None = None
    waiting: str | None = None
    opens: int = 0
    resets: int = 0
    closes: int = 0
    delivered: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    transactions: list[str] = field(default_factory=list)


class FakeSession:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.open = True

    async def send(self, sender: str, mail_options: list[str], recipients: list[str],
                   body: AsyncIterable[bytes]) -> Attempt:
        assert self.open
        server = self.server
        data = b"".join([chunk async for chunk in body])
        server.transactions.append(sender)
        if server.lose_during_send:
            server.lose_during_send -= 1
            self.open = False
            raise SessionLost("connection reset by peer")
        if not server.mail.ok:
            return Attempt(server.mail)
        replies = {r: server.rcpt.get(r, OK) for r in recipients}
        accepted = [r for r, reply in replies.items() if reply.ok]
        if not accepted:
            return Attempt(server.mail, replies)
        if server.data.ok:
            server.delivered.append((sender, accepted, data))
        return Attempt(server.mail, replies, server.data)

    async def reset(self) -> None:
        assert self.open
        self.server.resets += 1

    async def close(self) -> None:
        self.open = False
        self.server.closes += 1


class FakeDeliverer:
    def __init__(self, server: Server) -> None:
        self.server = server

    async def open(self, account: Account) -> FakeSession:
        assert account is ACCOUNT
        if self.server.refuse is not None:
            raise self.server.refuse
        self.server.opens += 1
        return FakeSession(self.server)

    def waiting_for(self, account: Account) -> str | None:
        return self.server.waiting


@dataclass
class Rig:
    spool: Spool
    server: Server
    worker: AccountWorker
    clock: Clock
    failures: list[str]

    async def queue(self, body: bytes = b"Subject: scan\r\n\r\npage\r\n",
                    sender: str = "scanner@example.com",
                    rcpts: tuple[str, ...] = ("a@example.net",)) -> str:
        reception = self.spool.receive(KEY, sender, list(rcpts))
        await reception.write(body)
        return (await reception.commit()).id

    async def ids(self) -> list[str]:
        return [r.id for r in await self.spool.index.call(self.spool.index.db.all)]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    clock = Clock(1_700_000_000.0)
    spool = await Spool.open(tmp_path / "q", clock=clock)
    server = Server()
    failures: list[str] = []

    async def on_failure(account: Account, reason: str) -> None:
        failures.append(reason)

    worker = AccountWorker(ACCOUNT, spool, FakeDeliverer(server), lifetime=5 * 86400,
                           max_backoff=3600, on_failure=on_failure, hostname="proxy.test",
                           clock=clock)
    try:
        yield Rig(spool, server, worker, clock, failures)
    finally:
        await spool.aclose()


async def test_arrival_order_one_session_rset_between(rig: Rig) -> None:
    bodies = [f"Subject: {i}\r\n\r\nbody {i}\r\n".encode() for i in range(5)]
    for body in bodies:
        await rig.queue(body)
    assert await rig.worker.step() == 0
    assert [d[2] for d in rig.server.delivered] == bodies
    assert rig.server.opens == 1 and rig.server.resets == 4
    assert await rig.ids() == []
    # Nothing queued: the worker looks again later (a new message wakes it); an idle
    # session is closed.
    assert 0 < await rig.worker.step() <= 30
    assert rig.server.closes == 0
    rig.clock.now += 31
    await rig.worker.step()
    assert rig.server.closes == 1
    await rig.queue()
    await rig.worker.step()
    assert rig.server.opens == 2 and len(rig.server.delivered) == 6


def test_backoff_doubles_from_a_minute_to_the_maximum() -> None:
    assert [backoff(n, 3600) for n in range(1, 9)] == [60, 120, 240, 480, 960, 1920, 3600,
                                                       3600]


async def test_partial_failure_delivers_to_the_accepted(rig: Rig) -> None:
    rig.server.rcpt = {"temp@example.net": Reply(451, "4.2.0 mailbox busy"),
                       "gone@example.net": Reply(550, "5.1.1 <gone@example.net>: no such user")}
    message_id = await rig.queue(rcpts=("ok@example.net", "temp@example.net",
                                        "gone@example.net"))
    await rig.worker.step()
    assert [d[1] for d in rig.server.delivered] == [["ok@example.net"]]
    record = await rig.spool.index.get(message_id)
    assert record is not None
    assert record.recipients == ["temp@example.net"] and record.attempts == 1
    assert record.next_attempt == rig.clock.now + 60
    assert record.last_error == "451 4.2.0 mailbox busy"
    # The permanent failure: a DSN to the sender, and a notification.
    dsns = [r for r in await rig.spool.index.call(rig.spool.index.db.all) if r.kind == "dsn"]
    assert len(dsns) == 1 and dsns[0].recipients == ["scanner@example.com"]
    assert dsns[0].sender == "" and rig.failures and "gone@example.net" in rig.failures[0]
    # Not due yet; then the second try fails again and waits twice as long.
    rig.server.delivered.clear()
    await rig.worker.step()  # sends the DSN only
    assert [d[0] for d in rig.server.delivered] == [""]
    rig.clock.now += 60
    await rig.worker.step()
    record = await rig.spool.index.get(message_id)
    assert record is not None and record.attempts == 2
    assert record.next_attempt == rig.clock.now + 120
    rig.server.rcpt = {}
    rig.clock.now += 120
    await rig.worker.step()
    assert rig.server.delivered[-1][1] == ["temp@example.net"]
    assert await rig.ids() == []


async def test_permanent_refusal_bounces_with_the_original_headers(rig: Rig) -> None:
    rig.server.rcpt = {"x@example.net": Reply(550, "5.1.1 <x@example.net>: unknown user")}
    await rig.queue(b"From: scanner@example.com\r\nSubject: Invoice 7\r\n\r\nsecret body\r\n",
                    rcpts=("x@example.net",))
    assert await rig.worker.step() == 0  # the DSN is due at once: the next round sends it
    await rig.worker.step()
    (sender, rcpts, data), = rig.server.delivered
    assert sender == "" and rcpts == ["scanner@example.com"]
    report = email.message_from_bytes(data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    _, status, original = report.get_payload()
    fields = status.get_payload()[1]
    assert fields["Status"] == "5.1.1" and fields["Action"] == "failed"
    assert fields["Diagnostic-Code"] == "smtp; 550 5.1.1 <x@example.net>: unknown user"
    assert "Subject: Invoice 7" in original.get_payload()
    assert b"secret body" not in data
    assert await rig.ids() == []


async def test_refused_at_mail_or_end_of_data(rig: Rig) -> None:
    rig.server.mail = Reply(553, "5.7.60 Client does not have permissions to send as this "
                            "sender")
    await rig.queue(sender="")  # a null sender: no DSN, but the notification
    await rig.worker.step()
    assert await rig.ids() == [] and rig.server.delivered == []
    assert len(rig.failures) == 1 and "5.7.60" in rig.failures[0]
    rig.server.mail = OK
    rig.server.data = Reply(554, "5.6.0 message refused")
    await rig.queue(rcpts=("a@example.net", "b@example.net"))
    await rig.worker.step()
    rig.server.data = OK
    await rig.worker.step()
    (sender, rcpts, data), = rig.server.delivered
    assert sender == "" and rcpts == ["scanner@example.com"]
    assert b"Status: 5.6.0" in data and b"b@example.net" in data


async def test_a_dsn_that_fails_is_not_bounced(rig: Rig) -> None:
    rig.server.rcpt = {"scanner@example.com": Reply(550, "5.1.1 no such user"),
                       "x@example.net": Reply(550, "5.1.1 no such user")}
    await rig.queue(rcpts=("x@example.net",))
    await rig.worker.step()
    await rig.worker.step()
    assert await rig.ids() == [] and rig.server.delivered == []
    assert len(rig.failures) == 2


async def test_temporary_failure_of_mail_defers_everyone(rig: Rig) -> None:
    rig.server.mail = Reply(421, "4.7.0 try later")  # a 421 would be SessionLost for real
    message_id = await rig.queue(rcpts=("a@example.net", "b@example.net"))
    await rig.worker.step()
    record = await rig.spool.index.get(message_id)
    assert record is not None and record.recipients == ["a@example.net", "b@example.net"]
    assert record.attempts == 1 and rig.failures == []


async def test_lifetime_expiry_bounces(rig: Rig) -> None:
    rig.server.rcpt = {"a@example.net": Reply(450, "4.2.1 mailbox unavailable")}
    message_id = await rig.queue()
    for _ in range(3):
        await rig.worker.step()
        rig.clock.now += 3600
    rig.clock.now += 5 * 86400
    await rig.worker.step()
    assert await rig.spool.index.get(message_id) is None
    assert rig.failures and "lifetime" in rig.failures[0]
    rig.server.rcpt = {}
    await rig.worker.step()
    (_, _, data), = rig.server.delivered
    assert b"Status: 4.4.7" in data and b"Action: failed" in data
    assert b"450 4.2.1 mailbox unavailable" in data


async def test_connection_lost_during_delivery_is_retried(rig: Rig) -> None:
    rig.server.lose_during_send = 1
    first = await rig.queue(b"Subject: 1\r\n\r\n1\r\n")
    await rig.queue(b"Subject: 2\r\n\r\n2\r\n")
    await rig.worker.step()
    # The first waits a minute; the second goes on a new session at once.
    assert [d[2] for d in rig.server.delivered] == [b"Subject: 2\r\n\r\n2\r\n"]
    assert rig.server.opens == 2
    record = await rig.spool.index.get(first)
    assert record is not None and "connection to the server lost" in (record.last_error or "")
    assert record.state == "queued"
    rig.clock.now += 60
    await rig.worker.step()
    assert len(rig.server.delivered) == 2 and await rig.ids() == []


async def test_login_failures_hold_the_account_back(rig: Rig) -> None:
    rig.server.refuse = SessionRefused("cannot reach smtp.example.com:587: refused")
    message_id = await rig.queue()
    await rig.worker.step()
    record = await rig.spool.index.get(message_id)
    assert record is not None and record.attempts == 1
    assert record.next_attempt == rig.clock.now + 60 and "cannot reach" in (
        record.last_error or "")
    # New mail during the hold waits for it too (no login per arriving message).
    await rig.queue()
    rig.clock.now += 30
    assert 0 < await rig.worker.step() <= POLL
    rig.clock.now += 30
    await rig.worker.step()  # the second failure: two minutes
    assert rig.worker.status.hold_until == rig.clock.now + 120
    # `mailproxy queue retry` ends the hold.
    rig.server.refuse = None
    rig.clock.now += 5
    assert admin.retry(rig.spool.directory, message_id, now=rig.clock.now) == 1
    await rig.worker.step()
    assert len(rig.server.delivered) == 1  # only the one asked for
    assert admin.retry(rig.spool.directory, None, now=rig.clock.now) == 1
    await rig.worker.step()
    assert len(rig.server.delivered) == 2 and await rig.ids() == []


async def test_retry_all_from_the_cli_makes_deferred_messages_due(rig: Rig) -> None:
    rig.server.rcpt = {"a@example.net": Reply(451, "4.3.0 later")}
    message_id = await rig.queue()
    await rig.worker.step()
    rig.server.rcpt = {}
    rig.clock.now += 5
    await rig.worker.step()
    assert rig.server.delivered == []
    assert admin.retry(rig.spool.directory, None, now=rig.clock.now) == 1
    await rig.worker.step()
    assert len(rig.server.delivered) == 1 and await rig.spool.index.get(message_id) is None


async def test_messages_wait_while_the_account_needs_authorization(rig: Rig) -> None:
    rig.server.waiting = "account Office@example.com needs authorization (invalid_grant)"
    message_id = await rig.queue()
    for _ in range(3):
        await rig.worker.step()
        rig.clock.now += 600
    assert rig.server.opens == 0
    record = await rig.spool.index.get(message_id)
    assert record is not None and record.attempts == 0
    assert "needs authorization" in (record.last_error or "")
    assert rig.worker.status.waiting_for is not None
    rig.server.waiting = None  # `mailproxy token import` happened
    await rig.worker.step()
    assert len(rig.server.delivered) == 1 and rig.worker.status.waiting_for is None


async def test_authorization_refused_at_login_also_waits(rig: Rig) -> None:
    rig.server.refuse = SessionRefused("revoked", authorization=True)
    message_id = await rig.queue()
    await rig.worker.step()
    record = await rig.spool.index.get(message_id)
    assert record is not None and record.attempts == 0 and record.last_error == "revoked"


async def test_rate_limit_paces_and_survives_a_restart(rig: Rig, tmp_path: Path) -> None:
    rig.worker.limiter.limits = Limits(messages_per_minute=2)
    for i in range(3):
        await rig.queue(f"Subject: {i}\r\n\r\n".encode())
    wait = await rig.worker.step()
    assert len(rig.server.delivered) == 2 and wait == pytest.approx(60)
    # A new worker (a restart) knows what was sent in the last minute.
    other = AccountWorker(ACCOUNT, rig.spool, FakeDeliverer(rig.server), lifetime=86400,
                          max_backoff=3600, limits=Limits(messages_per_minute=2),
                          clock=rig.clock)
    await other.load_history()
    rig.clock.now += 30
    assert await other.step() == pytest.approx(30)
    rig.clock.now += 30
    assert await other.step() == 0
    assert len(rig.server.delivered) == 3


async def test_run_wakes_for_new_messages_and_closes_on_cancel(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "q")
    server = Server()
    worker = AccountWorker(ACCOUNT, spool, FakeDeliverer(server), lifetime=86400,
                           max_backoff=3600)
    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(worker.run())
            await asyncio.sleep(0.05)
            reception = spool.receive(KEY, "s@example.com", ["r@example.net"])
            await reception.write(b"x\r\n")
            await reception.commit()
            worker.wake()
            for _ in range(100):
                if server.delivered:
                    break
                await asyncio.sleep(0.01)
            task.cancel()
        assert len(server.delivered) == 1 and server.closes == 1
    finally:
        await spool.aclose()


async def test_new_mail_and_expiry_do_not_end_a_login_hold(rig: Rig) -> None:
    rig.server.refuse = SessionRefused("cannot reach the server")
    old = await rig.queue()
    await rig.worker.step()
    hold = rig.worker.status.hold_until
    assert hold == rig.clock.now + 60
    await rig.queue()
    rig.worker.wake()  # what the service does for a new message
    assert 0 < await rig.worker.step() <= POLL
    assert rig.server.opens == 0 and rig.worker.status.hold_until == hold
    # Both expire; their DSNs are queued and wait for the server like everything else.
    rig.worker.lifetime = 30
    rig.clock.now += 61
    await rig.worker.step()
    assert await rig.spool.index.get(old) is None and len(rig.failures) == 2
    await rig.worker.step()
    assert rig.worker.status.hold_until == rig.clock.now + 120
    dsns = await rig.spool.index.call(rig.spool.index.db.all)
    assert [r.kind for r in dsns] == ["dsn", "dsn"] and rig.server.opens == 0
