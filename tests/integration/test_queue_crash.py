"""SIGKILL at random moments while the daemon receives into its queue and delivers to the
real Postfix, fifty times over (more on a slow machine, until fifty messages got a 250): no
message that got a 250 is lost or cut short; duplicates (a kill between Postfix's 250 and the
removal from the queue) are counted and reported.

Each daemon is forked from a process that imported it once (tests/support/forkserver.py):
a fresh interpreter spends ~1.5 s on imports, which fifty rounds cannot afford. Two clients
send all along (one with AUTH, one as a device without), each message on its own
connection, so every kill falls among receptions, and the worker delivers what the last run
left at once after each start, so kills fall among deliveries too; the test counts both.
Every other kill waits until the queue's index shows a delivery under way: on a slow machine
the first delivery after a start may come later than most random kills.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from proxy.queue import admin
from proxy.tokens.store import TokenState
from proxy.vault import Vault
from tests.integration.test_queue_smtp import send
from tests.integration.test_smtp_proxy import delivered
from tests.support.clirun import ROOT, listen_port, write_config
from tests.support.dovecot import Dovecot
from tests.support.forkserver import ForkServer
from tests.support.postfix import Postfix
from tests.support.proxyrun import LOCAL_PASSWORD
from tests.support.tokenserver import TEST_CLIENT_ID, TokenServer

# base64 of 32 random bytes: a text key that short or guessable is refused.
MASTER_KEY = "q8WZ3f0mJ6bZpQyT1vR2xN4cL7eA9sD5gH0kU3wYz6I="
KILLS = 50
# More rounds, up to this many, only while fewer than KILLS messages got their 250 (a slow
# machine spends most of a round starting up).
MAX_KILLS = 2 * KILLS
# A kill comes this long (uniformly at random) after the daemon listens: start-up, the first
# (slow-hash) login, receptions, and deliveries of what earlier runs left.
KILL_WITHIN = 0.8
# The other half: once a delivery is seen under way (waiting at most DELIVERY_WAIT seconds),
# a kill comes within DELIVERY_KILL_WITHIN seconds (most then still land inside a delivery).
DELIVERY_WAIT = 5.0
DELIVERY_KILL_WITHIN = 0.05
ROUND_LIMIT = 60.0  # seconds for one round (start, wait, kill): a hang, not a slow machine
SIZES = (100, 20_000, 300_000)  # bytes of "z" lines after the first line


def smtp_port(config: Path) -> int:
    lines = [x for x in config.read_text().splitlines() if x.startswith("listen")]
    return int(lines[2].rsplit(":", 1)[1].rstrip('"'))


async def start(forks: ForkServer, config: Path, env: dict[str, str]) -> int:
    """A daemon forked and listening on its SMTP port; its pid."""
    log = config.parent / "daemon.log"  # every run's log, for a failure
    pid = await forks.spawn(["run", "--config", str(config)], env=env, cwd=ROOT, log=log)
    port = smtp_port(config)
    for _ in range(3000):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return pid
        if await forks.poll(pid) is not None:
            raise AssertionError(log.read_text()[-3000:])
        await asyncio.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    await forks.wait(pid)
    raise AssertionError("mailproxy run did not start listening")


def delivering(queue: Path) -> bool:
    """Whether a row of the queue's index says "active" (a delivery under way). Read-only, so
    the running daemon's writes never wait for this look."""
    path = queue / "index.sqlite"
    if not path.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True,
                                                timeout=1)) as db:
            row = db.execute("SELECT 1 FROM messages WHERE state = 'active' LIMIT 1").fetchone()
    except sqlite3.OperationalError:  # not created yet, or busy a moment
        return False
    return row is not None


async def delivery_under_way(queue: Path, timeout: float) -> None:
    """Until a delivery is under way, or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not delivering(queue) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def test_sigkill_during_reception_and_delivery_loses_nothing(
        tmp_path: Path, token_server: TokenServer, dovecot: Dovecot, postfix: Postfix,
        mail_user: str) -> None:
    postfix.ensure_running()
    config = write_config(tmp_path, token_server, dovecot, mail_user, account=(
        f'smtp_server = "{postfix.host}:{postfix.smtps_port}"\nsmtp_tls = "implicit"'))
    # A device (no AUTH) on 127.0.0.2; AUTH with the local password from 127.0.0.1.
    config.write_text(config.read_text() + f'[[devices]]\nname = "scanner"\n'
                      f'networks = ["127.0.0.2"]\naccount = "{mail_user}"\n')
    refresh = token_server.authority.issue_refresh_token(mail_user, TEST_CLIENT_ID)
    # With a master key the daemon opens the vault at start and delivers at once after each
    # restart, before any client logs in.
    Vault(tmp_path / "state", master_key=MASTER_KEY.encode()).create(
        mail_user.casefold(), password=LOCAL_PASSWORD, state=TokenState(refresh_token=refresh))
    env = {**os.environ, "MAILPROXY_SMTP__DELIVERY": "queue",
           "MAILPROXY_VAULT__MASTER_KEY": "env:MAILPROXY_TEST_MASTER",
           "MAILPROXY_TEST_MASTER": MASTER_KEY}
    queue = tmp_path / "state" / "queue"
    rng = random.Random(int.from_bytes(os.urandom(4)))
    acked: set[int] = set()
    sizes: dict[int, int] = {}
    counter = 0
    in_session = 0  # clients between connecting and their last reply
    port = smtp_port(config)
    assert port != listen_port(config)
    stopping = asyncio.Event()

    async def client(device: bool) -> None:
        nonlocal counter, in_session
        while not stopping.is_set():
            n = counter
            counter += 1
            sizes[n] = size = rng.choice(SIZES)
            data = (f"From: {mail_user}\r\nTo: {mail_user}\r\nSubject: crash {n}\r\n\r\n"
                    f"token {n} size {size}\r\n".encode() + (b"z" * 98 + b"\r\n") * (size // 100))
            in_session += 1
            try:
                replies = await send(("127.0.0.1", port), mail_user, [mail_user], data,
                                     user=None if device else mail_user,
                                     local="127.0.0.2" if device else None)
            except (OSError, AssertionError, asyncio.IncompleteReadError):
                await asyncio.sleep(0.02)  # killed, or not listening yet
                continue
            finally:
                in_session -= 1
            if replies[-1].startswith("250"):
                acked.add(n)

    forks = await ForkServer.start(ROOT)
    pid: int | None = None
    during_reception = during_delivery = kills = 0
    started = time.monotonic()
    try:
        async with asyncio.TaskGroup() as tg:
            senders = [tg.create_task(client(device)) for device in (False, True)]
            while kills < KILLS or (len(acked) < KILLS and kills < MAX_KILLS):
                async with asyncio.timeout(ROUND_LIMIT):
                    pid = await start(forks, config, env)
                    if kills % 2:
                        await delivery_under_way(queue, DELIVERY_WAIT)
                        await asyncio.sleep(rng.uniform(0.0, DELIVERY_KILL_WITHIN))
                    else:
                        await asyncio.sleep(rng.uniform(0.0, KILL_WITHIN))
                    during_reception += in_session > 0
                    os.kill(pid, signal.SIGKILL)
                    await forks.wait(pid)
                    pid = None
                kills += 1
                # A delivery was under way when the kill came: its row still says so.
                during_delivery += any(r.state == "active" for r in admin.list_messages(queue))
            stopping.set()
            async with asyncio.timeout(ROUND_LIMIT):
                await asyncio.gather(*senders)
        killed = time.monotonic() - started
        # A last run with nothing killed: it empties the queue.
        pid = await start(forks, config, env)
        async with asyncio.timeout(120):
            while any((queue / "messages").iterdir()):  # (see tmp_path/daemon.log)
                await asyncio.sleep(0.1)
        postfix.flush()
        async with asyncio.timeout(60):
            while len({_token(m)[0] for m in delivered(dovecot, mail_user)}) < len(acked):
                await asyncio.sleep(0.1)
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            await forks.wait(pid)
        await forks.aclose()
    stored = [_token(m) for m in delivered(dovecot, mail_user)]
    counts = collections.Counter(n for n, _ in stored)
    cut_short = sorted(n for n, z in stored if z != sizes[n])
    lost = sorted(acked - counts.keys())
    duplicates = {n: c - 1 for n, c in counts.items() if c > 1}
    print(f"\n{kills} SIGKILLs in {killed:.0f} s ({during_reception} while a client was "
          f"sending, {during_delivery} while a delivery was under way); {len(acked)} messages "
          f"got 250, {len(counts)} distinct delivered, "
          f"{sum(duplicates.values())} duplicate(s): {duplicates}")
    assert len(acked) >= KILLS, "too few messages accepted to prove anything"
    assert during_reception >= kills // 2 and during_delivery >= 5, \
        "the kills missed the receptions or the deliveries"
    assert lost == [], f"lost after a 250: {lost}"
    assert cut_short == [], f"delivered cut short: {cut_short}"
    # At most the one message in flight per kill can go twice.
    assert sum(duplicates.values()) <= kills


def _token(stored: bytes) -> tuple[int, int]:
    """The message's number, and its size as it arrived (as sent: 100 bytes a line)."""
    match = re.search(rb"token (\d+) size \d+\r?\n", stored)
    if match is None:
        pytest.fail(f"a message without a token: {stored[:200]!r}")
    return int(match[1]), stored.count(b"z", match.end()) // 98 * 100
