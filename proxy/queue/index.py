"""The queue's index: one SQLite database (``synchronous=FULL``, WAL) with a row per queued
message (envelope, pending recipients, attempts, next attempt, last error) and a log of what
each account sent in the last day (for the rate limits, so a restart does not reset them).

``IndexDb`` is synchronous (the CLI uses it directly); ``Index`` runs it on one thread of
its own so the event loop never waits on the disk. The database is the arbiter between the
daemon and the CLI: both may have it open; every change is one committed transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

T = TypeVar("T")

SENT_WINDOW = 86400.0  # the rate limits look back one day at most
BUSY_TIMEOUT_MS = 10_000

Kind = Literal["message", "dsn"]
State = Literal["queued", "active"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    account TEXT NOT NULL,
    sender TEXT NOT NULL,
    mail_options TEXT NOT NULL,
    recipients TEXT NOT NULL,
    size INTEGER NOT NULL,
    received REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error TEXT,
    state TEXT NOT NULL DEFAULT 'queued',
    kind TEXT NOT NULL DEFAULT 'message'
);
CREATE INDEX IF NOT EXISTS messages_due ON messages (account, state, next_attempt, seq);
CREATE TABLE IF NOT EXISTS sent (
    account TEXT NOT NULL,
    at REAL NOT NULL,
    recipients INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sent_account ON sent (account, at);
"""

_COLUMNS = ("id, account, sender, mail_options, recipients, size, received, attempts, "
            "next_attempt, last_error, state, kind")
# Built from constants only.
_SELECT = f"SELECT {_COLUMNS} FROM messages"  # noqa: S608
_INSERT = f"INSERT INTO messages ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"  # noqa: S608


@dataclass
class Record:
    """One queued message. ``sender`` is "" for the null sender (a DSN); ``recipients`` are
    those still to be delivered."""

    id: str
    account: str  # the account's key (case-folded address)
    sender: str
    recipients: list[str]
    size: int
    received: float
    next_attempt: float
    mail_options: list[str] = field(default_factory=list)
    attempts: int = 0
    last_error: str | None = None
    state: State = "queued"
    kind: Kind = "message"

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "account": self.account, "sender": self.sender,
                "recipients": list(self.recipients), "size": self.size,
                "received": self.received, "attempts": self.attempts,
                "next_attempt": self.next_attempt, "last_error": self.last_error,
                "state": self.state, "kind": self.kind, "mail_options": list(self.mail_options)}


def _record(row: tuple[Any, ...]) -> Record:
    (id_, account, sender, options, recipients, size, received, attempts, next_attempt,
     last_error, state, kind) = row
    return Record(id=id_, account=account, sender=sender, mail_options=json.loads(options),
                  recipients=json.loads(recipients), size=size, received=received,
                  attempts=attempts, next_attempt=next_attempt, last_error=last_error,
                  state=state, kind=kind)


@dataclass(frozen=True)
class AccountStats:
    account: str
    queued: int
    size: int
    oldest: float | None  # when the oldest message was received
    last_error: str | None  # of the message tried most recently that failed


class Queued(NamedTuple):
    """What one account has in the queue: how many messages, and when the oldest came."""

    messages: int
    oldest: float


class IndexDb:
    """The index on one SQLite connection; use it from one thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000,
                                  isolation_level=None, check_same_thread=False)
        try:
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self.db.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is on disk (WAL fsynced) before it returns; the 250 waits for it.
            self.db.execute("PRAGMA synchronous = FULL")
            with self._transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
        except BaseException:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    def _transaction(self) -> _Tx:
        return _Tx(self.db)

    # -- writes ---------------------------------------------------------------------------

    def insert(self, record: Record) -> None:
        with self._transaction():
            self.db.execute(
                _INSERT,
                (record.id, record.account, record.sender, json.dumps(record.mail_options),
                 json.dumps(record.recipients), record.size, record.received, record.attempts,
                 record.next_attempt, record.last_error, record.state, record.kind))

    def set_state(self, message_id: str, state: State) -> bool:
        with self._transaction():
            cursor = self.db.execute("UPDATE messages SET state = ? WHERE id = ?",
                                     (state, message_id))
        return cursor.rowcount > 0

    def update(self, record: Record, *, sent: tuple[float, int] | None = None) -> bool:
        """Write back recipients, attempts, next attempt, last error and state; with
        ``sent`` (time, recipients), log a delivery in the same transaction. False if the
        message is gone (deleted with the CLI meanwhile)."""
        with self._transaction():
            cursor = self.db.execute(
                "UPDATE messages SET recipients = ?, attempts = ?, next_attempt = ?, "
                "last_error = ?, state = ? WHERE id = ?",
                (json.dumps(record.recipients), record.attempts, record.next_attempt,
                 record.last_error, record.state, record.id))
            if sent is not None:
                self._log_sent(record.account, *sent)
        return cursor.rowcount > 0

    def remove(self, message_id: str, *, sent: tuple[str, float, int] | None = None) -> bool:
        """Delete the row; with ``sent`` (account, time, recipients) log a delivery in the
        same transaction."""
        with self._transaction():
            cursor = self.db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            if sent is not None:
                self._log_sent(*sent)
        return cursor.rowcount > 0

    def _log_sent(self, account: str, at: float, recipients: int) -> None:
        self.db.execute("INSERT INTO sent (account, at, recipients) VALUES (?,?,?)",
                        (account, at, recipients))
        self.db.execute("DELETE FROM sent WHERE account = ? AND at < ?",
                        (account, at - SENT_WINDOW))

    def retry(self, message_id: str | None, now: float) -> int:
        """Make one message (None: all) due now; how many rows changed."""
        with self._transaction():
            if message_id is None:
                cursor = self.db.execute("UPDATE messages SET next_attempt = ? "
                                         "WHERE next_attempt > ?", (now, now))
                return cursor.rowcount
            cursor = self.db.execute("UPDATE messages SET next_attempt = MIN(next_attempt, ?) "
                                     "WHERE id = ?", (now, message_id))
            return cursor.rowcount

    def restart(self, now: float) -> int:
        """At start: deliveries in flight go back to the queue, and everything is due now."""
        with self._transaction():
            cursor = self.db.execute("UPDATE messages SET state = 'queued', next_attempt = ? "
                                     "WHERE state != 'queued' OR next_attempt > ?", (now, now))
            return cursor.rowcount

    # -- reads ----------------------------------------------------------------------------

    def get(self, message_id: str) -> Record | None:
        row = self.db.execute(_SELECT + " WHERE id = ?",
                              (message_id,)).fetchone()
        return _record(row) if row else None

    def all(self, account: str | None = None) -> list[Record]:
        if account is None:
            rows = self.db.execute(_SELECT + " ORDER BY seq").fetchall()
        else:
            rows = self.db.execute(_SELECT + " WHERE account = ? ORDER BY seq",
                                   (account,)).fetchall()
        return [_record(row) for row in rows]

    def ids(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT id FROM messages")}

    def due(self, account: str, now: float, limit: int) -> list[Record]:
        """The account's queued messages due by ``now``, in arrival order."""
        rows = self.db.execute(
            _SELECT + " WHERE account = ? AND state = 'queued' AND next_attempt <= ? "
            "ORDER BY seq LIMIT ?", (account, now, limit)).fetchall()
        return [_record(row) for row in rows]

    def next_due(self, account: str, tried: bool = False) -> float | None:
        """When the account's next message is due; ``tried``: among those tried before."""
        row = self.db.execute("SELECT MIN(next_attempt) FROM messages WHERE account = ? "
                              "AND state = 'queued' AND attempts >= ?",
                              (account, 1 if tried else 0)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def total_size(self) -> int:
        row = self.db.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()
        return int(row[0])

    def sent_since(self, account: str, since: float) -> list[tuple[float, int]]:
        return [(float(at), int(n)) for at, n in self.db.execute(
            "SELECT at, recipients FROM sent WHERE account = ? AND at >= ? ORDER BY at",
            (account, since))]

    def summary(self) -> dict[str, Queued]:
        """Per account with messages: their count and the oldest's reception time."""
        return {account: Queued(int(count), float(oldest)) for account, count, oldest in
                self.db.execute("SELECT account, COUNT(*), MIN(received) FROM messages "
                                "GROUP BY account")}

    def stats(self) -> dict[str, AccountStats]:
        out: dict[str, AccountStats] = {}
        for account, count, size, oldest in self.db.execute(
                "SELECT account, COUNT(*), SUM(size), MIN(received) FROM messages "
                "GROUP BY account"):
            row = self.db.execute(
                "SELECT last_error FROM messages WHERE account = ? AND last_error IS NOT NULL "
                "ORDER BY attempts DESC, seq LIMIT 1", (account,)).fetchone()
            out[account] = AccountStats(account, int(count), int(size or 0),
                                        float(oldest) if oldest is not None else None,
                                        row[0] if row else None)
        return out


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): writers queue up instead of failing
    half-way with SQLITE_BUSY on upgrade."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


class Index:
    """``IndexDb`` for the event loop: every call runs on the index's own thread."""

    def __init__(self, db: IndexDb, executor: concurrent.futures.ThreadPoolExecutor) -> None:
        self.db = db
        self._executor = executor

    @classmethod
    async def open(cls, path: Path) -> Index:
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="queue-index")
        try:
            db = await asyncio.get_running_loop().run_in_executor(executor, IndexDb, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(db, executor)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def aclose(self) -> None:
        await self.call(self.db.close)
        self._executor.shutdown(wait=True)

    # The common calls, typed.
    async def insert(self, record: Record) -> None:
        await self.call(self.db.insert, record)

    async def due(self, account: str, now: float, limit: int = 50) -> list[Record]:
        return await self.call(self.db.due, account, now, limit)

    async def next_due(self, account: str, tried: bool = False) -> float | None:
        return await self.call(self.db.next_due, account, tried)

    async def total_size(self) -> int:
        return await self.call(self.db.total_size)

    async def stats(self) -> dict[str, AccountStats]:
        return await self.call(self.db.stats)

    async def summary(self) -> dict[str, Queued]:
        return await self.call(self.db.summary)

    async def get(self, message_id: str) -> Record | None:
        return await self.call(self.db.get, message_id)

    async def set_state(self, message_id: str, state: State) -> bool:
        return await self.call(self.db.set_state, message_id, state)

    async def update(self, record: Record, *, sent: tuple[float, int] | None = None) -> bool:
        return await self.call(lambda: self.db.update(record, sent=sent))

    async def sent_since(self, account: str, since: float) -> list[tuple[float, int]]:
        return await self.call(self.db.sent_since, account, since)

