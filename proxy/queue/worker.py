"""The delivery worker of one account: takes its due messages in arrival order and sends them
over one logged-in upstream session (RSET between messages), with back-off, lifetime,
rate limits, partial recipient failure and DSNs.

The upstream is behind two small protocols (upstream.py), so this logic is tested with a
fake and an injected clock; ``deliver.py`` is the real one over ``proxy/smtp/upstream.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..config import Account
from . import dsn
from .index import SENT_WINDOW, Record
from .ratelimit import Limits, RateLimiter
from .spool import Spool
from .upstream import Deliverer, Reply, SessionLost, SessionRefused, UpstreamSession

log = logging.getLogger("mailproxy.queue")

FIRST_BACKOFF = 60.0
# How often an idle worker looks at the index (new retries from `mailproxy queue retry`).
POLL = 2.0
# How often a worker with nothing queued looks anyway (a new message wakes it at once).
IDLE_POLL = 30.0
# How often an account waiting for authorization checks again (cheap: no network).
AUTH_POLL = 5.0
# A logged-in upstream session with nothing to send is closed after this long.
SESSION_IDLE = 30.0
BATCH = 20
CLOSE_TIMEOUT = 5.0


def backoff(attempts: int, max_backoff: float) -> float:
    """Seconds to wait after the ``attempts``-th failed try: 60, 120, 240, ... up to max."""
    return min(FIRST_BACKOFF * 2.0 ** max(attempts - 1, 0), max_backoff)


# Called when messages failed for good: (account, reason); the daemon sends `message_failed`.
FailureSink = Callable[[Account, str], Awaitable[None]]


async def _no_sink(account: Account, reason: str) -> None:
    pass


@dataclass
class WorkerStatus:
    delivered: int = 0
    failed: int = 0
    last_error: str | None = None
    last_delivery: float | None = None
    waiting_for: str | None = None  # authorization
    hold_until: float | None = None  # account-level back-off


class AccountWorker:
    def __init__(self, account: Account, spool: Spool, deliverer: Deliverer, *,
                 lifetime: float, max_backoff: float, limits: Limits | None = None,
                 on_failure: FailureSink = _no_sink, hostname: str = "localhost",
                 clock: Callable[[], float] = time.time) -> None:
        self.account = account
        self.key = account.key
        self.spool = spool
        self.deliverer = deliverer
        self.lifetime = lifetime
        self.max_backoff = max_backoff
        self.limiter = RateLimiter(limits or Limits())
        self.on_failure = on_failure
        self.hostname = hostname
        self.clock = clock
        self.status = WorkerStatus()
        self._session: UpstreamSession | None = None
        self._used = False  # the session carried a transaction: RSET before the next
        self._last_used = 0.0
        self._failures = 0  # consecutive failures to open a session
        self._hold_until = 0.0
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look at the queue now (a new message). An account held back after failed logins
        stays held: only a retry (a tried message made due earlier) ends that."""
        self._wake.set()

    async def load_history(self) -> None:
        """What was sent in the last day counts against the limits after a restart too."""
        now = self.clock()
        self.limiter = RateLimiter(self.limiter.limits,
                                   await self.spool.index.sent_since(self.key, now - SENT_WINDOW))

    async def run(self) -> None:
        """Deliver until cancelled."""
        await self.load_history()
        try:
            while True:
                # Cleared before looking, so a wake() while a round runs is not lost.
                self._wake.clear()
                try:
                    delay = await self.step()
                except Exception:
                    log.exception("queue: delivery worker of %s failed; trying again shortly",
                                  self.account.address)
                    await self._drop()
                    delay = POLL
                if delay > 0:
                    await self._nap(delay)
        finally:
            await asyncio.shield(self._drop())

    async def _nap(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass

    # -- one round ------------------------------------------------------------------------

    async def step(self) -> float:
        """Deliver what is due now; the seconds to wait before the next round (0: at once)."""
        now = self.clock()
        if self._hold_until > now:
            # Held back after failed logins; `mailproxy queue retry` makes a message that
            # was tried due earlier, which ends the hold (new arrivals do not).
            due = await self.spool.index.next_due(self.key, tried=True)
            if due is None or due >= self._hold_until:
                return min(self._hold_until - now, POLL)
            self._hold_until = 0.0
        reason = self.deliverer.waiting_for(self.account)
        if reason is not None:
            await self._wait_for_person(reason, now)
            return AUTH_POLL
        self.status.waiting_for = None
        batch = await self.spool.index.due(self.key, now, BATCH)
        if not batch:
            if self._session is not None and now - self._last_used >= SESSION_IDLE:
                await self._drop()
            due = await self.spool.index.next_due(self.key)
            if due is None:  # nothing queued: a new message wakes the worker
                return IDLE_POLL if self._session is None else min(SESSION_IDLE, IDLE_POLL)
            return max(0.0, min(due - now, POLL))
        for record in batch:
            now = self.clock()
            if now - record.received >= self.lifetime:
                await self._expire(record)
                continue
            wait = self.limiter.delay(now, len(record.recipients))
            if wait > 0:
                log.debug("queue: %s paced by its sending limits for %.0f s",
                          self.account.address, wait)
                return wait
            try:
                session = await self._ready_session()
            except SessionRefused as refused:
                if refused.authorization:
                    await self._wait_for_person(refused.text, now)
                    return AUTH_POLL
                await self._defer_account(refused.text, now)
                return min(self._hold_until - now, POLL)
            await self._attempt(record, session)
        return 0.0

    async def _ready_session(self) -> UpstreamSession:
        if self._session is not None and self._used:
            try:
                await self._session.reset()
                self._used = False
            except SessionLost as exc:
                log.info("queue: upstream session of %s lost (%s); logging in again",
                         self.account.address, exc)
                await self._drop()
        if self._session is None:
            self._session = await self.deliverer.open(self.account)
            self._used = False
            self._failures = 0
            self.status.hold_until = None
        return self._session

    async def _drop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await session.close()
            except (TimeoutError, SessionLost, OSError):
                pass

    # -- outcomes -------------------------------------------------------------------------

    async def _attempt(self, record: Record, session: UpstreamSession) -> None:
        index = self.spool.index
        try:
            body = await self.spool.open_message(record.id)
        except FileNotFoundError:
            log.warning("queue: message %s vanished (deleted meanwhile?)", record.id)
            await self.spool.discard(record.id)
            return
        await index.set_state(record.id, "active")
        record.attempts += 1
        self._used = True
        lost = ""
        try:
            attempt = await session.send(record.sender, record.mail_options,
                                         list(record.recipients), body)
        except SessionLost as exc:
            await self._drop()
            attempt = None
            lost = f"connection to the server lost during delivery ({exc})"
        finally:
            await body.aclose()
        now = self.clock()
        self._last_used = now
        delivered: list[str] = []
        failed: list[dsn.Failure] = []
        deferred: dict[str, Reply] = {}
        if attempt is None:
            deferred = {r: Reply(451, f"4.4.2 {lost}") for r in record.recipients}
        elif not attempt.mail.ok:
            for rcpt in record.recipients:
                self._classify(rcpt, attempt.mail, failed, deferred)
        else:
            accepted = []
            for rcpt in record.recipients:
                reply = attempt.recipients.get(rcpt) or Reply(451, "4.3.0 no reply to RCPT")
                if reply.ok:
                    accepted.append(rcpt)
                else:
                    self._classify(rcpt, reply, failed, deferred)
            if accepted:
                end = attempt.data or Reply(451, "4.3.0 no reply to the end of the message")
                if end.ok:
                    delivered = accepted
                else:
                    for rcpt in accepted:
                        self._classify(rcpt, end, failed, deferred)
        if delivered:
            self.status.delivered += 1
            self.status.last_delivery = now
            self.limiter.record(now, len(delivered))
            log.info("queue: %s delivered for %s to %d recipient(s) (attempt %d)", record.id,
                     self.account.address, len(delivered), record.attempts)
        if failed:
            await self._bounce(record, failed)
        sent = (now, len(delivered)) if delivered else None
        if deferred:
            first = next(iter(deferred.values()))
            record.recipients = [r for r in record.recipients if r in deferred]
            record.last_error = str(first)
            record.next_attempt = now + backoff(record.attempts, self.max_backoff)
            record.state = "queued"
            self.status.last_error = record.last_error
            log.info("queue: %s deferred for %s: %s; next try in %.0f s", record.id,
                     self.account.address, record.last_error, record.next_attempt - now)
            await index.update(record, sent=sent)
        else:
            await self.spool.discard(record.id,
                                     sent=(self.key, *sent) if sent is not None else None)

    @staticmethod
    def _classify(rcpt: str, reply: Reply, failed: list[dsn.Failure],
                  deferred: dict[str, Reply]) -> None:
        if reply.permanent:
            failed.append(dsn.Failure(rcpt, str(reply), dsn.status_of(str(reply))))
        else:
            deferred[rcpt] = reply

    async def _expire(self, record: Record) -> None:
        days = self.lifetime / 86400
        said = f"{days:g} day(s)" if days >= 1 else f"{self.lifetime:g} s"
        text = (f"not delivered within the queue lifetime of {said}; last error: "
                f"{record.last_error or 'none'}")
        await self._bounce(record, [dsn.Failure(r, text, "4.4.7", remote=False)
                                    for r in record.recipients])
        await self.spool.discard(record.id)

    async def _bounce(self, record: Record, failures: list[dsn.Failure]) -> None:
        """Permanent failures: a DSN to the sender (unless null) and a notification."""
        self.status.failed += 1
        self.status.last_error = failures[0].reply
        names = ", ".join(f.recipient for f in failures)
        log.warning("queue: %s from <%s> failed for %s: %s", record.id, record.sender, names,
                    failures[0].reply)
        if record.sender and record.kind != "dsn":
            try:
                headers = await self.spool.headers(record.id)
                report = dsn.build(reporting_host=self.hostname,
                                   account_address=self.account.address,
                                   sender=record.sender, failures=failures, headers=headers,
                                   received=record.received, now=self.clock(),
                                   message_id=record.id)
                queued = await self.spool.add(self.key, "", [record.sender], report,
                                              kind="dsn")
                log.info("queue: DSN %s queued for <%s> about %s", queued.id, record.sender,
                         record.id)
            except OSError as exc:
                log.error("queue: cannot queue a DSN about %s: %s", record.id, exc)
        await self.on_failure(self.account, f"message {record.id} from <{record.sender}> "
                              f"could not be delivered to {names}: {failures[0].reply}")

    async def _defer_account(self, text: str, now: float) -> None:
        """No session (server down, token endpoint down): the due messages wait together."""
        self._failures += 1
        delay = backoff(self._failures, self.max_backoff)
        self._hold_until = now + delay
        self.status.hold_until = self._hold_until
        self.status.last_error = text
        log.warning("queue: cannot log in for %s: %s; trying again in %.0f s",
                    self.account.address, text, delay)
        for record in await self.spool.index.due(self.key, now, 10_000):
            if now - record.received >= self.lifetime:
                await self._expire(record)
                continue
            record.attempts += 1
            record.last_error = text
            record.next_attempt = self._hold_until
            await self.spool.index.update(record)

    async def _wait_for_person(self, reason: str, now: float) -> None:
        """The account needs authorization: nothing is tried (expired messages still bounce)
        until it has it; the token side sends its own notification."""
        first = self.status.waiting_for != reason
        await self._drop()
        for record in await self.spool.index.due(self.key, now, 10_000):
            if now - record.received >= self.lifetime:
                await self._expire(record)
            elif first and record.last_error != reason:
                record.last_error = reason
                await self.spool.index.update(record)
        # Said once the messages carry the reason too (status and index agree).
        self.status.waiting_for = reason
        self.status.last_error = reason
        if first:
            log.warning("queue: messages of %s wait: %s", self.account.address, reason)
