"""The queue as the daemon runs it: lock, recovery, workers per account, notifications,
status, and the summary its metrics read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.config import Account, QueueSettings, Settings
from proxy.daemon.metrics import Metrics
from proxy.queue import service as queue_service
from proxy.queue.service import QueueLocked, QueueService
from proxy.queue.upstream import Reply
from tests.unit.test_queue_worker import ACCOUNT, FakeDeliverer, Server

IMAP_ONLY = Account(address="reader@example.com", provider="custom", client_id="c",
                    token_url="http://127.0.0.1:1/token", scopes=[],
                    imap_server="127.0.0.1:993")


def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path, accounts=[ACCOUNT, IMAP_ONLY],
                    queue=QueueSettings(max_size=0, min_free=0))


async def test_service_delivers_notifies_and_reports(tmp_path: Path) -> None:
    server = Server(rcpt={"gone@example.net": Reply(550, "5.1.1 no such user")})
    notified: list[tuple[str, str]] = []

    async def notify(account: Account, reason: str) -> None:
        notified.append((account.address, reason))

    service = QueueService(settings(tmp_path), FakeDeliverer(server), notify=notify,
                           hostname="proxy.test")
    spool = await service.start()
    assert spool.directory == tmp_path / "queue"
    assert set(service.workers) == {ACCOUNT.key}  # no SMTP server, no worker
    with pytest.raises(QueueLocked, match="another mailproxy daemon"):
        await QueueService(settings(tmp_path), FakeDeliverer(server), notify=notify,
                           hostname="x").start()
    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(service.run())
            dropped = spool.receive(ACCOUNT.key, "", ["x@example.net"])
            await dropped.write(b"y" * 300_000)  # a temporary file exists
            service.abandon(dropped)
            reception = spool.receive(ACCOUNT.key, "", ["ok@example.net", "gone@example.net"])
            await reception.write(b"Subject: x\r\n\r\n")
            await reception.commit()
            service.wake(ACCOUNT.key)
            for _ in range(200):
                if notified and server.delivered:
                    break
                await asyncio.sleep(0.01)
            status = await service.status()
            task.cancel()
        assert [d[1] for d in server.delivered] == [["ok@example.net"]]
        assert notified and notified[0][0] == ACCOUNT.address
        assert "gone@example.net" in notified[0][1]
        entry = status[ACCOUNT.key]
        assert entry["queued"] == 0 and entry["delivered"] == 1 and entry["failed"] == 1
        assert "5.1.1" in entry["last_error"]
        assert list(spool.incoming.iterdir()) == []  # the abandoned reception was swept
    finally:
        await service.aclose()
    # Unlocked once closed: the next start works (and recovers).
    again = QueueService(settings(tmp_path), FakeDeliverer(server), notify=notify,
                         hostname="x")
    await again.start()
    await again.aclose()


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


async def test_metrics_read_the_queue_from_memory(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_service, "SUMMARY_DELAY", 0.01)
    server = Server(waiting="authorization_required")  # nothing goes until it is cleared

    async def notify(account: Account, reason: str) -> None:
        pass

    # Messages "received" 100 s ago, so their age is plain to see.
    service = QueueService(settings(tmp_path), FakeDeliverer(server), notify=notify,
                           hostname="x", clock=lambda: time.time() - 100)
    spool = await service.start()
    metrics = Metrics()
    metrics.watch_queue(lambda: [ACCOUNT, IMAP_ONLY], service.summary)

    def queued(account: str) -> float | None:
        return metrics.registry.get_sample_value("mailproxy_queue_messages",
                                                 {"account": account})

    def oldest() -> float | None:
        return metrics.registry.get_sample_value("mailproxy_queue_oldest_age_seconds")

    try:
        # An account that can send shows 0; one without SMTP is not shown.
        assert queued(ACCOUNT.address) == 0 and queued(IMAP_ONLY.address) is None
        assert oldest() == 0
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(service.run())
            for _ in range(2):
                await spool.add(ACCOUNT.key, "s@example.com", ["r@example.net"], b"S: x\r\n")
            # A message of an account since removed from the configuration: under its key.
            await spool.add("gone@example.com", "", ["r@example.net"], b"S: x\r\n")
            await _until(lambda: queued(ACCOUNT.address) == 2
                         and queued("gone@example.com") == 1)
            age = oldest()
            assert age is not None and 100 <= age < 200
            server.waiting = None
            service.wake(ACCOUNT.key)
            await _until(lambda: queued(ACCOUNT.address) == 0)
            assert len(server.delivered) == 2 and queued("gone@example.com") == 1
            task.cancel()
    finally:
        await service.aclose()
