"""SIGKILL while messages are received and delivered (a real process, killed at random
moments, restarted): every message that got its 250 is delivered at least once; duplicates
(a kill between the upstream's 250 and the removal from the queue) are counted."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Rounds for this long, and on a slow machine (each round starts an interpreter) beyond it
# until MIN_KILLS kills and MIN_ACKED acknowledged messages are in, up to MAX_SECONDS.
SECONDS = 12.0
MAX_SECONDS = 60.0
MIN_KILLS = 4
MIN_ACKED = 20

# The child: receives `produce` messages (printing each 250) while its worker delivers to an
# "upstream" that stores each message with an fsync before it answers 250; `drain`: run until
# the queue is empty, then exit.
_CHILD = textwrap.dedent("""
    import asyncio, os, random, sys, uuid
    from pathlib import Path
    from proxy.config import Account
    from proxy.queue.spool import Spool
    from proxy.queue.upstream import Attempt, Reply
    from proxy.queue.worker import AccountWorker

    directory, outbox = Path(sys.argv[1]), Path(sys.argv[2])
    produce, first, drain, seed = (int(x) for x in sys.argv[3:7])
    rng = random.Random(seed)
    OK = Reply(250, "2.0.0 Ok")
    ACCOUNT = Account(address="a@example.com", provider="custom", client_id="c",
                      token_url="http://127.0.0.1:1/t", scopes=[], smtp_server="127.0.0.1:25")

    class Session:
        async def send(self, sender, options, rcpts, body):
            data = b"".join([c async for c in body])
            await asyncio.sleep(rng.random() * 0.004)
            # Stored whole or not at all (a kill mid-write is a delivery without its 250).
            name = uuid.uuid4().hex
            fd = os.open(outbox / (name + ".tmp"), os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            os.rename(outbox / (name + ".tmp"), outbox / name)
            return Attempt(OK, {r: OK for r in rcpts}, OK)
        async def reset(self): pass
        async def close(self): pass

    class Deliverer:
        async def open(self, account):
            return Session()
        def waiting_for(self, account):
            return None

    async def main() -> None:
        spool = await Spool.open(directory)
        await spool.recover()
        worker = AccountWorker(ACCOUNT, spool, Deliverer(), lifetime=86400, max_backoff=60)
        print("ready", flush=True)
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(worker.run())
            for n in range(first, first + produce):
                reception = spool.receive(ACCOUNT.key, "s@example.com", ["r@example.net"])
                await reception.write(f"X-Token: {n}\\r\\n\\r\\n".encode()
                                      + os.urandom(rng.choice([10, 3000, 80000])).hex().encode()
                                      + b"\\r\\n")
                await reception.commit()
                print("ack", n, flush=True)
                worker.wake()
                await asyncio.sleep(rng.random() * 0.003)
            while drain and await spool.index.total_size() > 0:
                await asyncio.sleep(0.02)
            # A discard removes the row, then the file: the last one may still be unlinking.
            # Cancelled meanwhile it would leave its file (swept only at the next start), so
            # wait for that; a file still there after 5 s is for the test to report.
            for _ in range(250):
                if not drain or not os.listdir(directory / "messages"):
                    break
                await asyncio.sleep(0.02)
            if drain:
                task.cancel()
        await spool.aclose()
        print("drained", flush=True)

    asyncio.run(main())
""")


def token(data: bytes) -> int:
    return int(data.split(b"\r\n", 1)[0].removeprefix(b"X-Token: "))


def test_sigkill_during_reception_and_delivery(tmp_path: Path) -> None:
    directory, outbox = tmp_path / "queue", tmp_path / "outbox"
    outbox.mkdir()
    acked: set[int] = set()
    rng = random.Random(1414)
    next_token = 0
    kills = 0
    started = time.monotonic()

    def more() -> bool:
        elapsed = time.monotonic() - started
        enough = kills >= MIN_KILLS and len(acked) >= MIN_ACKED
        return kills < 40 and (elapsed < SECONDS or (not enough and elapsed < MAX_SECONDS))

    while more():
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(directory), str(outbox), "25", str(next_token),
             "0", str(kills)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        next_token += 25
        time.sleep(0.05 + rng.random() * 0.4)
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        kills += 1
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "ack":
                acked.add(int(parts[1]))
    final = subprocess.run(
        [sys.executable, "-c", _CHILD, str(directory), str(outbox), "0", "0", "1", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "drained" in final.stdout, final.stderr
    counts = collections.Counter(token((outbox / name).read_bytes())
                                 for name in os.listdir(outbox) if not name.endswith(".tmp"))
    lost = sorted(acked - counts.keys())
    duplicates = sum(n - 1 for n in counts.values())
    print(f"{kills} kills, {len(acked)} messages acknowledged, {len(counts)} delivered, "
          f"{duplicates} duplicate(s), lost {lost}")
    assert kills >= MIN_KILLS and len(acked) >= MIN_ACKED, "too few rounds to prove anything"
    assert lost == []
    # Never more than one duplicate per kill (the one in flight at the moment of the kill).
    assert duplicates <= kills
    assert os.listdir(directory / "incoming") == []
    assert os.listdir(directory / "messages") == []
