"""SIGKILL at random moments while the daemon receives into its queue and delivers to the
real Postfix, over and over: no message that got a 250 is lost; duplicates (a kill between
Postfix's 250 and the removal from the queue) are counted and reported."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from proxy.tokens.store import TokenState
from proxy.vault import Vault
from tests.integration.test_queue_smtp import send
from tests.integration.test_smtp_proxy import delivered
from tests.support.clirun import ROOT, listen_port, write_config
from tests.support.dovecot import Dovecot
from tests.support.postfix import Postfix
from tests.support.proxyrun import LOCAL_PASSWORD
from tests.support.tokenserver import TEST_CLIENT_ID, TokenServer

# base64 of 32 random bytes: a text key that short or guessable is refused.
MASTER_KEY = "q8WZ3f0mJ6bZpQyT1vR2xN4cL7eA9sD5gH0kU3wYz6I="
# As many kill rounds as fit in this time (CI: about two minutes).
BUDGET = 110.0 if os.environ.get("CI") else 60.0


def smtp_port(config: Path) -> int:
    lines = [x for x in config.read_text().splitlines() if x.startswith("listen")]
    return int(lines[2].rsplit(":", 1)[1].rstrip('"'))


async def start(config: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    log = config.parent / "daemon.log"
    with log.open("ab") as out:  # every run's log, for a failure
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "--config", str(config), cwd=ROOT, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=out)
    port = smtp_port(config)
    for _ in range(600):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return proc
        if proc.returncode is not None:
            raise AssertionError(log.read_text()[-3000:])
        await asyncio.sleep(0.05)
    raise AssertionError("mailproxy run did not start listening")


async def test_sigkill_during_reception_and_delivery_loses_nothing(
        tmp_path: Path, token_server: TokenServer, dovecot: Dovecot, postfix: Postfix,
        mail_user: str) -> None:
    postfix.ensure_running()
    config = write_config(tmp_path, token_server, dovecot, mail_user, account=(
        f'smtp_server = "{postfix.host}:{postfix.smtps_port}"\nsmtp_tls = "implicit"'))
    refresh = token_server.authority.issue_refresh_token(mail_user, TEST_CLIENT_ID)
    # With a master key the daemon opens the vault at start and delivers at once after each
    # restart, before any client logs in.
    Vault(tmp_path / "state", master_key=MASTER_KEY.encode()).create(
        mail_user.casefold(), password=LOCAL_PASSWORD, state=TokenState(refresh_token=refresh))
    env = {**os.environ, "MAILPROXY_SMTP__DELIVERY": "queue",
           "MAILPROXY_VAULT__MASTER_KEY": "env:MAILPROXY_TEST_MASTER",
           "MAILPROXY_TEST_MASTER": MASTER_KEY}
    rng = random.Random(int.from_bytes(os.urandom(4)))
    acked: set[int] = set()
    counter = 0
    kills = 0
    deadline = time.monotonic() + BUDGET
    port = smtp_port(config)
    assert port != listen_port(config)

    async def client() -> None:
        nonlocal counter
        while True:
            n = counter
            counter += 1
            body = f"token {n}\r\n".encode() + b"z" * rng.choice([100, 20_000, 300_000]) \
                + b"\r\n"
            data = (f"From: {mail_user}\r\nTo: {mail_user}\r\nSubject: crash {n}\r\n\r\n"
                    .encode() + body)
            try:
                replies = await send(("127.0.0.1", port), mail_user, [mail_user], data,
                                     user=mail_user)
            except (OSError, AssertionError, asyncio.IncompleteReadError):
                return  # killed
            if replies[-1].startswith("250"):
                acked.add(n)

    while time.monotonic() < deadline:
        proc = await start(config, env)
        sender = asyncio.create_task(client())
        # Once this run has said 250 (its start and the first login are slow on a busy
        # machine), kill it somewhere among the receptions and deliveries that follow.
        before = len(acked)
        async with asyncio.timeout(30):
            while len(acked) == before and not sender.done():
                await asyncio.sleep(0.02)
        await asyncio.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        kills += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(sender, 10)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    # A last run with nothing killed: it empties the queue.
    proc = await start(config, env)
    try:
        queue = tmp_path / "state" / "queue" / "messages"
        async with asyncio.timeout(120):
            while any(queue.iterdir()):  # (see tmp_path/daemon.log if this times out)
                await asyncio.sleep(0.2)
        postfix.flush()
        async with asyncio.timeout(60):
            while len({_token(m) for m in delivered(dovecot, mail_user)}) < len(acked):
                await asyncio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    counts = collections.Counter(_token(m) for m in delivered(dovecot, mail_user))
    lost = sorted(acked - counts.keys())
    duplicates = {n: c - 1 for n, c in counts.items() if c > 1}
    print(f"\n{kills} SIGKILLs, {len(acked)} messages got 250, {len(counts)} distinct "
          f"delivered, {sum(duplicates.values())} duplicate(s): {duplicates}")
    assert kills >= 3 and len(acked) >= 10, "too few rounds to prove anything"
    assert lost == [], f"lost after a 250: {lost}"
    assert sum(duplicates.values()) <= kills


def _token(stored: bytes) -> int:
    match = re.search(rb"token (\d+)", stored)
    if match is None:
        pytest.fail(f"a message without a token: {stored[:200]!r}")
    return int(match[1])
