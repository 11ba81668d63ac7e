"""The queue's spool and index: the acceptance boundary (fsync, rename, directory fsync,
commit, in that order), crash safety at every step (simulated and with SIGKILL), start-up
recovery, size limits."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.queue import spool as spool_module
from proxy.queue.index import IndexDb
from proxy.queue.spool import QueueFull, Spool
from tests.support.clock import ManualClock as Clock

ROOT = Path(__file__).resolve().parents[2]


class Crash(BaseException):
    """A kill at a chosen step: nothing after it runs, no cleanup either."""


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = await Spool.open(tmp_path / "q")
    try:
        yield s
    finally:
        await s.aclose()


async def receive(spool: Spool, data: bytes, *, account: str = "a@example.org",
                  sender: str = "dev@example.org", rcpts: list[str] | None = None) -> str:
    reception = spool.receive(account, sender, rcpts or ["r@example.net"], ["BODY=8BITMIME"])
    for i in range(0, len(data), 7000):
        await reception.write(data[i:i + 7000])
    return (await reception.commit()).id


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_commit_stores_the_message_and_its_envelope(spool: Spool) -> None:
    data = b"Subject: hi\r\n\r\n" + os.urandom(600_000).hex().encode() + b"\r\n"
    message_id = await receive(spool, data, rcpts=["x@example.net", "y@example.net"])
    assert (spool.messages / message_id).read_bytes() == data
    assert files(spool.incoming) == []
    record = await spool.index.get(message_id)
    assert record is not None
    assert (record.account, record.sender, record.recipients, record.size) == (
        "a@example.org", "dev@example.org", ["x@example.net", "y@example.net"], len(data))
    assert record.mail_options == ["BODY=8BITMIME"] and record.attempts == 0
    assert record.state == "queued" and record.kind == "message"
    # Another connection (the CLI) sees it: committed, not just written.
    other = IndexDb(spool.directory / "index.sqlite")
    try:
        assert other.ids() == {message_id}
        assert other.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        other.close()


async def test_null_sender_and_empty_message(spool: Spool) -> None:
    reception = spool.receive("a@example.org", "<>", ["r@example.net"])
    record = await reception.commit()
    assert record.sender == "" and record.size == 0
    assert (spool.messages / record.id).read_bytes() == b""


async def test_the_steps_happen_in_order(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename
    real_insert = IndexDb.insert

    def fsync(fd: int) -> None:
        steps.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def rename(src: str, dst: str) -> None:
        steps.append("rename")
        real_rename(src, dst)

    def insert(self: IndexDb, record: object) -> None:
        steps.append("commit")
        real_insert(self, record)  # type: ignore[arg-type]

    monkeypatch.setattr(spool_module.os, "fsync", fsync)
    monkeypatch.setattr(spool_module.os, "rename", rename)
    monkeypatch.setattr(IndexDb, "insert", insert)
    await receive(spool, b"Subject: x\r\n\r\nbody\r\n")
    assert steps == ["fsync file", "rename", "fsync dir", "commit"]


@pytest.mark.parametrize("step", ["written", "renamed", "dir_synced", "committed"])
async def test_a_crash_at_any_step_loses_nothing_that_was_acknowledged(
        tmp_path: Path, step: str) -> None:
    directory = tmp_path / "q"
    first = await Spool.open(directory)
    kept = await receive(first, b"Subject: earlier\r\n\r\nsafe\r\n")

    def crash(at: str) -> None:
        if at == step:
            raise Crash(at)

    first.fault = crash
    with pytest.raises(Crash):
        await receive(first, b"Subject: crashing\r\n\r\n" + b"x" * 300_000 + b"\r\n")
    await first.aclose()

    # The next start: whatever got no 250 is gone, the rest is intact and due at once.
    second = await Spool.open(directory)
    try:
        recovery = await second.recover()
        ids = await second.index.call(second.index.db.ids)
        if step == "committed":  # the row was committed: the message is queued (no 250
            assert len(ids) == 2  # was sent, so the client may send it again: at least once)
        else:
            assert ids == {kept}
        assert files(second.incoming) == []
        assert set(files(second.messages)) == ids
        assert (second.messages / kept).read_bytes() == b"Subject: earlier\r\n\r\nsafe\r\n"
        expected = {"written": (1, 0), "renamed": (0, 1), "dir_synced": (0, 1),
                    "committed": (0, 0)}[step]
        assert (recovery.temporaries, recovery.orphans) == expected
    finally:
        await second.aclose()


async def test_recover_requeues_deliveries_in_flight_and_makes_all_due(tmp_path: Path) -> None:
    clock = Clock(1_700_000_000.0)
    s = await Spool.open(tmp_path / "q", clock=clock)
    a = await receive(s, b"a\r\n")
    b = await receive(s, b"b\r\n")
    await s.index.set_state(a, "active")
    record = await s.index.get(b)
    assert record is not None
    record.next_attempt = clock.now + 3000
    record.attempts = 3
    await s.index.update(record)
    (s.incoming / "ABANDONED.tmp").write_bytes(b"half a message")
    await s.aclose()

    clock.now += 100
    s = await Spool.open(tmp_path / "q", clock=clock)
    try:
        recovery = await s.recover()
        assert recovery.requeued == 2 and recovery.temporaries == 1
        for message_id in (a, b):
            r = await s.index.get(message_id)
            assert r is not None and r.state == "queued" and r.next_attempt == clock.now
        assert [r.id for r in await s.index.due("a@example.org", clock.now)] == [a, b]
    finally:
        await s.aclose()


async def test_recover_drops_rows_whose_file_is_gone(spool: Spool) -> None:
    a = await receive(spool, b"a\r\n")
    (spool.messages / a).unlink()
    recovery = await spool.recover()
    assert recovery.missing == 1
    assert await spool.index.get(a) is None


async def test_abort_leaves_nothing(spool: Spool) -> None:
    reception = spool.receive("a@example.org", "s@example.org", ["r@example.net"])
    await reception.write(b"x" * 400_000)  # past the buffer: a temporary file exists
    assert files(spool.incoming) != []
    await reception.abort()
    assert files(spool.incoming) == [] and files(spool.messages) == []
    assert await spool.index.total_size() == 0


async def test_max_size_refuses_new_messages_and_keeps_the_queued(tmp_path: Path) -> None:
    s = await Spool.open(tmp_path / "q", max_size=10_000)
    try:
        kept = await receive(s, b"k" * 6_000)
        await s.check_space()  # 6000 of 10000: room left
        # Over the limit only once the message is complete: refused at commit, nothing kept.
        with pytest.raises(QueueFull, match="max_size"):
            await receive(s, b"y" * 5_000)
        assert files(s.incoming) == [] and files(s.messages) == [kept]
        await receive(s, b"z" * 3_000)
        with pytest.raises(QueueFull):
            await s.check_space(1_001)
        # A reception in progress counts too.
        r = s.receive("a@example.org", "s@example.org", ["r@example.net"])
        await r.write(b"w" * 900)
        with pytest.raises(QueueFull):
            await s.check_space(200)
        await r.abort()
        await s.check_space(200)
        record = await s.index.get(kept)
        assert record is not None and (s.messages / kept).read_bytes() == b"k" * 6_000
        # DSNs are queued whatever the budget: nothing is lost for want of a report.
        await s.add("a@example.org", "", ["s@example.org"], b"report\r\n", kind="dsn")
    finally:
        await s.aclose()


async def test_free_space_floor(tmp_path: Path) -> None:
    s = await Spool.open(tmp_path / "q", min_free=1 << 62)
    try:
        with pytest.raises(QueueFull, match="floor"):
            await s.check_space()
    finally:
        await s.aclose()


async def test_headers_are_unstuffed_and_cut_at_the_blank_line(spool: Spool) -> None:
    message_id = await receive(spool, b"Subject: a\r\n..hidden: x\r\nTo: b\r\n\r\n..body\r\n")
    assert await spool.headers(message_id) == b"Subject: a\r\n.hidden: x\r\nTo: b\r\n"


async def test_open_message_reads_in_chunks(spool: Spool) -> None:
    data = os.urandom(700_000)
    message_id = await receive(spool, data)
    body = await spool.open_message(message_id)
    chunks = [chunk async for chunk in body]
    await body.aclose()
    assert b"".join(chunks) == data and len(chunks) == 3
    with pytest.raises(FileNotFoundError):
        await spool.open_message("NOPE")


async def test_discard_removes_row_then_file(spool: Spool) -> None:
    message_id = await receive(spool, b"m\r\n")
    await spool.discard(message_id, sent=("a@example.org", 5.0, 1))
    assert await spool.index.get(message_id) is None
    assert files(spool.messages) == []
    assert await spool.index.sent_since("a@example.org", 0) == [(5.0, 1)]


_CHILD = textwrap.dedent("""
    import asyncio, hashlib, os, random, sys
    from pathlib import Path
    from proxy.queue.spool import Spool

    async def main() -> None:
        spool = await Spool.open(Path(sys.argv[1]))
        await spool.recover()
        rng = random.Random(int(sys.argv[2]))
        print("ready", flush=True)
        while True:
            data = os.urandom(rng.choice([10, 5_000, 100_000, 600_000]))
            reception = spool.receive("a@example.org", "s@example.org", ["r@example.net"])
            for i in range(0, len(data), 65536):
                await reception.write(data[i:i + 65536])
            record = await reception.commit()
            # The 250: only now may the client count on the message.
            print(record.id, hashlib.sha256(data).hexdigest(), flush=True)

    asyncio.run(main())
""")


def test_sigkill_at_random_moments_never_loses_an_acknowledged_message(tmp_path: Path) -> None:
    directory = tmp_path / "q"
    acknowledged: dict[str, str] = {}
    rng = random.Random(14)
    for round_ in range(12):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(directory), str(round_)],
                                 cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        for _ in range(rng.randint(0, 4)):
            line = child.stdout.readline().split()
            acknowledged[line[0]] = line[1]
        # Kill somewhere inside the next message(s): a random pause, then SIGKILL.
        child_pause = rng.random() * 0.05
        try:
            child.wait(timeout=child_pause)
        except subprocess.TimeoutExpired:
            pass
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2:  # a whole line was printed: that 250 was given
                acknowledged[parts[0]] = parts[1]
    check = subprocess.run(
        [sys.executable, "-c", textwrap.dedent("""
            import asyncio, sys
            from pathlib import Path
            from proxy.queue.spool import Spool
            async def main() -> None:
                spool = await Spool.open(Path(sys.argv[1]))
                print(await spool.recover())
                await spool.aclose()
            asyncio.run(main())
        """), str(directory)], cwd=ROOT, check=True, capture_output=True, text=True)
    assert "Recovery(" in check.stdout
    db = IndexDb(directory / "index.sqlite")
    try:
        ids = db.ids()
    finally:
        db.close()
    assert acknowledged, "no message was acknowledged: the test proved nothing"
    for message_id, digest in acknowledged.items():
        assert message_id in ids
        data = (directory / "messages" / message_id).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest
    assert sorted(os.listdir(directory / "messages")) == sorted(ids)
    assert os.listdir(directory / "incoming") == []


async def test_commit_keeps_the_message_without_the_end_marker(spool: Spool) -> None:
    reception = spool.receive("a@example.org", "s@example.org", ["r@example.net"])
    body = b"Subject: x\r\n\r\n" + b"y" * 300_000 + b"\r\n"
    assert reception.add(body[:100]) is False
    assert reception.add(body[100:] + b".\r\n") is True  # past the buffer: flush now
    await reception.flush()
    record = await reception.commit(size=len(body))
    assert record.size == len(body)
    assert (spool.messages / record.id).read_bytes() == body
    small = spool.receive("a@example.org", "s@example.org", ["r@example.net"])
    small.add(b"hi\r\n.\r\n")
    record = await small.commit(size=4)
    assert (spool.messages / record.id).read_bytes() == b"hi\r\n" and record.size == 4
