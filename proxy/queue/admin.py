"""``mailproxy queue list|show|retry|delete``: synchronous functions on the queue directory.

They work whether or not the daemon runs: the index is the arbiter, every change is one
committed transaction, and the daemon's workers look at the index every few seconds (a
retry makes a message due now; they notice it there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .index import AccountStats, IndexDb, Record
from .spool import _read_headers, _unlink


class NoSuchMessage(LookupError):
    def __init__(self, message_id: str) -> None:
        super().__init__(f"no message {message_id!r} in the queue")


@contextlib.contextmanager
def _index(directory: Path) -> Iterator[IndexDb | None]:
    path = directory / "index.sqlite"
    if not path.exists():  # nothing was ever queued: do not create anything
        yield None
        return
    db = IndexDb(path)
    try:
        yield db
    finally:
        db.close()


def list_messages(directory: Path) -> list[Record]:
    with _index(directory) as db:
        return db.all() if db else []


def get(directory: Path, message_id: str) -> Record:
    with _index(directory) as db:
        record = db.get(message_id) if db else None
    if record is None:
        raise NoSuchMessage(message_id)
    return record


def headers(directory: Path, message_id: str) -> bytes:
    try:
        return _read_headers(directory / "messages" / message_id)
    except FileNotFoundError:
        raise NoSuchMessage(message_id) from None


def retry(directory: Path, message_id: str | None, now: float | None = None) -> int:
    """Make a message (None: every message) due now; how many were waiting."""
    with _index(directory) as db:
        if db is None:
            if message_id is not None:
                raise NoSuchMessage(message_id)
            return 0
        if message_id is not None and db.get(message_id) is None:
            raise NoSuchMessage(message_id)
        return db.retry(message_id, time.time() if now is None else now)


def delete(directory: Path, message_id: str) -> Record:
    """Remove a message without sending it (no DSN). If the daemon is delivering it at this
    moment, that delivery may still complete."""
    with _index(directory) as db:
        record = db.get(message_id) if db else None
        if record is None or db is None:
            raise NoSuchMessage(message_id)
        db.remove(message_id)
    _unlink(directory / "messages" / message_id)
    return record


def stats(directory: Path) -> dict[str, AccountStats]:
    with _index(directory) as db:
        return db.stats() if db else {}


def as_json(records: list[Record]) -> list[dict[str, Any]]:
    return [record.as_json() for record in records]


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def render_list(records: list[Record], now: float | None = None) -> str:
    if not records:
        return "The queue is empty."
    now = time.time() if now is None else now
    lines = []
    for r in records:
        sender = r.sender or "<>"
        due = "now" if r.next_attempt <= now else f"in {_age(r.next_attempt - now)}"
        state = "delivering" if r.state == "active" else f"next try {due}"
        lines.append(f"{r.id}  {r.size:>9} B  {_age(now - r.received):>4} old  "
                     f"{r.account}  {sender} -> {', '.join(r.recipients)}")
        lines.append(f"    {r.attempts} attempt(s), {state}"
                     + (f"; last error: {r.last_error}" if r.last_error else ""))
    total = sum(r.size for r in records)
    lines.append(f"{len(records)} message(s), {total} bytes.")
    return "\n".join(lines)


def render_show(record: Record, head: bytes) -> str:
    lines = [
        f"id:            {record.id}" + (" (delivery status notification)"
                                          if record.kind == "dsn" else ""),
        f"account:       {record.account}",
        f"sender:        {record.sender or '<>'}",
        f"recipients:    {', '.join(record.recipients)}",
        f"size:          {record.size} bytes",
        f"received:      {_when(record.received)}",
        f"attempts:      {record.attempts}",
        f"state:         {'delivering' if record.state == 'active' else 'queued'}",
        f"next attempt:  {_when(record.next_attempt)}",
        f"last error:    {record.last_error or '-'}",
        "",
        head.decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", "\n"),
    ]
    return "\n".join(lines)


# -- the command line ---------------------------------------------------------------------


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``mailproxy queue ...`` on the CLI's subparsers."""
    queue = sub.add_parser(
        "queue", parents=parents, help="look at and manage the outbound queue",
        description="The messages the outbound queue holds. Works while the daemon runs: "
                    "its delivery workers see a retry within seconds.")
    qsub = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    qlist = qsub.add_parser("list", parents=parents, help="list queued messages")
    qlist.add_argument("--json", action="store_true", help="machine-readable output")
    qshow = qsub.add_parser("show", parents=parents,
                            help="a message's envelope, state and headers")
    qshow.add_argument("id", metavar="ID")
    qretry = qsub.add_parser("retry", parents=parents, help="try a message (or all) now")
    which = qretry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", metavar="ID", nargs="?")
    which.add_argument("--all", action="store_true", help="every queued message")
    qdelete = qsub.add_parser("delete", parents=parents,
                              help="remove a message without sending it (no bounce)")
    qdelete.add_argument("id", metavar="ID")


def run(directory: Path, args: argparse.Namespace) -> int:
    """Run ``mailproxy queue ACTION``; 0, or 1 when the message is not in the queue."""
    try:
        if args.action == "list":
            records = list_messages(directory)
            if args.json:
                print(json.dumps(as_json(records), indent=2))
            else:
                print(render_list(records))
        elif args.action == "show":
            print(render_show(get(directory, args.id), headers(directory, args.id)))
        elif args.action == "retry":
            count = retry(directory, None if args.all else args.id)
            print(f"{count} message(s) due now." if args.all else f"{args.id} is due now.")
        else:
            record = delete(directory, args.id)
            print(f"{record.id} deleted ({record.sender or '<>'} -> "
                  f"{', '.join(record.recipients)}).")
    except NoSuchMessage as exc:
        print(f"mailproxy: {exc}", file=sys.stderr)
        return 1
    return 0
