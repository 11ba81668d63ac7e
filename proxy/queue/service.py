"""The outbound queue as the daemon runs it: the spool (opened, locked, recovered at start),
a delivery worker per account, failure notifications handed on without holding up delivery,
the status shown by ``mailproxy status``, and a summary kept in memory for the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..config import Account, Settings
from .index import Queued
from .ratelimit import Limits
from .spool import Reception, Recovery, Spool
from .upstream import Deliverer
from .worker import AccountWorker

log = logging.getLogger("mailproxy.queue")

# (account, reason): the daemon turns it into a `message_failed` notification.
Notify = Callable[[Account, str], Awaitable[None]]

# The summary the metrics read is read from the index again this long after a message was
# queued or removed (at most once in that time, however many came), and this often anyway:
# `mailproxy queue delete` changes the index from another process.
SUMMARY_DELAY = 1.0
SUMMARY_POLL = 15.0


class QueueLocked(Exception):
    """Another process (a second daemon) delivers from this queue."""


def limits_of(account: Account) -> Limits:
    return Limits(messages_per_minute=account.max_messages_per_minute or None,
                  messages_per_day=account.max_messages_per_day or None,
                  recipients_per_day=account.max_recipients_per_day or None)


class QueueService:
    def __init__(self, settings: Settings, deliverer: Deliverer, *, notify: Notify,
                 hostname: str, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.deliverer = deliverer
        self.notify = notify
        self.hostname = hostname
        self.clock = clock
        self.spool: Spool | None = None
        self.workers: dict[str, AccountWorker] = {}
        self.recovery: Recovery | None = None
        self._lock_fd: int | None = None
        self._failures: asyncio.Queue[tuple[Account, str]] = asyncio.Queue()
        self._abandoned: asyncio.Queue[Reception] = asyncio.Queue()
        self._summary: dict[str, Queued] = {}
        self._summary_due = asyncio.Event()

    async def start(self) -> Spool:
        """Open and lock the queue directory and clean up after a crash; before listening."""
        queue = self.settings.queue
        directory = self.settings.queue_dir
        spool = await Spool.open(directory, max_size=queue.max_size, min_free=queue.min_free,
                                 clock=self.clock)
        try:
            self._lock_fd = await asyncio.to_thread(_lock, directory / "lock")
            self.recovery = await spool.recover()
            self._summary = await spool.index.summary()
        except BaseException:
            await spool.aclose()
            raise
        self.spool = spool
        spool.changed = self._summary_due.set
        for account in self.settings.accounts:
            if account.server("smtp") is None:
                continue
            self.workers[account.key] = AccountWorker(
                account, spool, self.deliverer, lifetime=queue.lifetime,
                max_backoff=queue.max_backoff, limits=limits_of(account),
                on_failure=self._failed, hostname=self.hostname, clock=self.clock)
        return spool

    async def run(self) -> None:
        """The workers and the notification sender, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for key, worker in self.workers.items():
                tg.create_task(worker.run(), name=f"queue-{key}")
            tg.create_task(self._send_failures(), name="queue-notify")
            tg.create_task(self._sweep(), name="queue-sweep")
            tg.create_task(self._keep_summary(), name="queue-summary")

    async def aclose(self) -> None:
        if self.spool is not None:
            await self.spool.aclose()
            self.spool = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def wake(self, account_key: str) -> None:
        """A message for the account was just committed."""
        worker = self.workers.get(account_key)
        if worker is not None:
            worker.wake()

    def abandon(self, reception: Reception) -> None:
        """Drop a reception from code that cannot await (a transaction's ``abort``): its
        temporary file is removed by the service's own task (and at the next start anyway)."""
        self._abandoned.put_nowait(reception)

    def summary(self) -> dict[str, Queued]:
        """Per account key with messages queued: their count and the oldest's reception time,
        from memory (for the metrics: a scrape never waits on the disk). It follows the
        daemon's own changes within ``SUMMARY_DELAY`` and the CLI's within ``SUMMARY_POLL``."""
        return self._summary

    async def _keep_summary(self) -> None:
        spool = self.spool
        assert spool is not None
        while True:
            self._summary_due.clear()  # before reading: a change meanwhile reads again
            try:
                self._summary = await spool.index.summary()
            except Exception as exc:  # the index is busy or broken: keep the last one
                log.warning("queue: cannot read the queue's summary: %s", exc)
            await asyncio.sleep(SUMMARY_DELAY)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SUMMARY_POLL):
                    await self._summary_due.wait()

    async def _sweep(self) -> None:
        while True:
            reception = await self._abandoned.get()
            try:
                await reception.abort()
            except OSError as exc:
                log.warning("queue: cannot remove an unfinished reception: %s", exc)

    async def _failed(self, account: Account, reason: str) -> None:
        self._failures.put_nowait((account, reason))

    async def _send_failures(self) -> None:
        while True:
            account, reason = await self._failures.get()
            try:
                await self.notify(account, reason)
            except Exception:
                log.exception("queue: the message_failed notification for %s failed",
                              account.address)

    async def status(self) -> dict[str, dict[str, Any]]:
        """Per account key: queued count and bytes, oldest age, last error, waiting, ..."""
        if self.spool is None:
            return {}
        stats = await self.spool.index.stats()
        now = self.clock()
        out: dict[str, dict[str, Any]] = {}
        for key in {*self.workers, *stats}:
            st = stats.get(key)
            worker = self.workers.get(key)
            entry: dict[str, Any] = {
                "queued": st.queued if st else 0,
                "queued_bytes": st.size if st else 0,
                "oldest_age": now - st.oldest if st and st.oldest is not None else None,
                "last_error": (worker.status.last_error if worker and worker.status.last_error
                               else st.last_error if st else None),
            }
            if worker is not None:
                entry.update(delivered=worker.status.delivered, failed=worker.status.failed,
                             last_delivery=worker.status.last_delivery,
                             waiting_for=worker.status.waiting_for,
                             hold_until=worker.status.hold_until)
            out[key] = entry
        return out


def _lock(path: os.PathLike[str]) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise QueueLocked(f"another mailproxy daemon is using the queue in "
                          f"{os.path.dirname(path)}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd
