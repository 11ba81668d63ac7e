"""``mailproxy queue list|show|retry|delete`` as functions on the queue directory, used while
the daemon's spool has the same index open."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.queue import admin
from proxy.queue.spool import Spool


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = await Spool.open(tmp_path / "q")
    try:
        yield s
    finally:
        await s.aclose()


async def queue(spool: Spool, body: bytes, rcpts: list[str]) -> str:
    reception = spool.receive("office@example.com", "scanner@example.com", rcpts)
    await reception.write(body)
    return (await reception.commit()).id


def test_an_empty_or_missing_queue(tmp_path: Path) -> None:
    assert admin.list_messages(tmp_path / "nothing") == []
    assert admin.render_list([]) == "The queue is empty."
    assert admin.retry(tmp_path / "nothing", None) == 0
    with pytest.raises(admin.NoSuchMessage, match="no message 'X' in the queue"):
        admin.delete(tmp_path / "nothing", "X")
    assert not (tmp_path / "nothing").exists()  # nothing created by looking


async def test_list_show_retry_delete(spool: Spool) -> None:
    a = await queue(spool, b"Subject: first\r\n\r\nbody\r\n", ["x@example.net"])
    b = await queue(spool, b"Subject: second\r\n\r\n", ["y@example.net", "z@example.net"])
    record = await spool.index.get(a)
    assert record is not None
    record.attempts, record.last_error = 2, "451 4.3.0 try later"
    record.next_attempt += 900
    await spool.index.update(record)

    listed = admin.as_json(admin.list_messages(spool.directory))
    assert json.loads(json.dumps(listed)) == listed
    assert [m["id"] for m in listed] == [a, b]
    first = listed[0]
    for key in ("id", "account", "sender", "recipients", "size", "attempts", "next_attempt",
                "last_error"):
        assert key in first
    assert first["account"] == "office@example.com"
    assert first["sender"] == "scanner@example.com" and first["recipients"] == ["x@example.net"]
    assert first["size"] == 24 and first["attempts"] == 2
    assert first["last_error"] == "451 4.3.0 try later"

    text = admin.render_list(admin.list_messages(spool.directory), now=record.received)
    assert a in text and "next try in 15m" in text and "451 4.3.0 try later" in text
    assert "2 message(s), 43 bytes." in text

    shown = admin.render_show(admin.get(spool.directory, a), admin.headers(spool.directory, a))
    assert "Subject: first" in shown and "body" not in shown and "attempts:      2" in shown

    # The daemon's index sees the CLI's changes at once.
    assert admin.retry(spool.directory, a, now=record.received) == 1
    again = await spool.index.get(a)
    assert again is not None and again.next_attempt == record.received

    deleted = admin.delete(spool.directory, b)
    assert deleted.recipients == ["y@example.net", "z@example.net"]
    assert await spool.index.get(b) is None and not (spool.messages / b).exists()
    with pytest.raises(admin.NoSuchMessage):
        admin.get(spool.directory, b)
    stats = admin.stats(spool.directory)
    assert stats["office@example.com"].queued == 1
    assert stats["office@example.com"].last_error == "451 4.3.0 try later"
