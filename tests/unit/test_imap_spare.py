"""Spare upstream IMAP sessions (``sessions.spare``): handed out only while usable (open and
quiet, young enough, the account unchanged, its grant not revoked), made after a client login
in the holder's own task group, and never in the way of a client when making one fails."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from proxy.config import Account, ImapListener, Settings
from proxy.login import Refusal
from proxy.observe import Observer
from proxy.sessions import spare as spare_module
from proxy.sessions.spare import SpareSessions, boot_clock
from proxy.tokens.store import TokenState
from tests.support.clock import ManualClock as Clock


class Conn:
    def __init__(self) -> None:
        self.quiet = True


class Session:
    def __init__(self, account: Account) -> None:
        self.account = account
        self.conn: Conn | None = None
        self.logged_in: object | None = None
        self.closed = False

    def close(self) -> None:
        self.closed = True
        if self.conn is not None:
            self.conn.quiet = False


class Results(Observer):
    def __init__(self) -> None:
        self.spares: list[str] = []

    def spare(self, proto: str, result: str) -> None:
        assert proto == "imap"
        self.spares.append(result)


class Gate:
    """What the spares need of ``login.Gate``: relogin, the observer, token states."""

    def __init__(self) -> None:
        self.observer = Results()
        self.states: dict[str, TokenState] = {}
        self.tokens = SimpleNamespace(source=SimpleNamespace(last_state=self.states.__getitem__))
        self.fail = False
        self.hold: asyncio.Event | None = None  # a login that waits for this
        self.logins = 0

    async def relogin(self, account: Account, session: Session, *, spare: bool = False) -> None:
        assert spare
        self.logins += 1
        if self.hold is not None:
            await self.hold.wait()
        if self.fail:
            session.close()
            raise Refusal("unavailable", "cannot reach the server; try again later")
        session.conn = Conn()
        session.logged_in = object()


def account(address: str = "a@example.com", **extra: Any) -> Account:
    return Account(address=address, provider="gmail", client_id="id", **extra)


def settings(*accounts: Account, spare_sessions: int = 1, spare_idle: float = 600) -> Settings:
    return Settings(state_dir=Path("/tmp/state"), accounts=list(accounts),
                    imap=ImapListener(spare_sessions=spare_sessions, spare_idle=spare_idle))


def holder(gate: Gate, config: Settings, clock: Clock | None = None) -> SpareSessions:
    for a in config.accounts:
        gate.states.setdefault(a.key, TokenState(refresh_token="rt"))
    return SpareSessions(gate, config, make=Session, clock=clock or Clock())  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(spares: SpareSessions) -> AsyncIterator[SpareSessions]:
    task = asyncio.create_task(spares.run())
    await asyncio.sleep(0)
    try:
        yield spares
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def made(spares: SpareSessions, key: str = "a@example.com") -> None:
    """Let the spare being made for ``key`` finish."""
    async with asyncio.timeout(2):
        while key in spares._making:
            await asyncio.sleep(0)


async def test_a_spare_is_made_after_a_login_and_handed_out_once() -> None:
    gate, a = Gate(), account()
    async with running(holder(gate, settings(a))) as spares:
        assert await spares.take(a) is None  # none before a client logged in
        spares.used(a)
        spares.used(a)  # one at a time per account
        await made(spares)
        assert gate.logins == 1 and spares.pool.idle(a.key) == 1
        spares.used(a)  # already has its one
        assert gate.logins == 1
        session = await spares.take(a)
        assert session is not None and not session.closed
        assert await spares.take(a) is None
    assert gate.observer.spares == ["miss", "hit", "miss"]


async def test_expired_after_spare_idle_with_the_clock() -> None:
    gate, a, clock = Gate(), account(), Clock()
    async with running(holder(gate, settings(a, spare_idle=300), clock)) as spares:
        spares.used(a)
        await made(spares)
        clock.now += 299
        spares.pool.expire()
        assert spares.pool.idle(a.key) == 1
        clock.now += 2
        spare = spares.pool._idle[a.key][0][1]
        assert await spares.take(a) is None and spare.session.closed
    assert gate.observer.spares == ["stale"]


async def test_bytes_from_the_server_or_a_close_make_it_stale() -> None:
    gate, a = Gate(), account()
    async with running(holder(gate, settings(a))) as spares:
        for _ in range(2):
            spares.used(a)
            await made(spares)
            spare = spares.pool._idle[a.key][0][1]
            assert spare.session.conn is not None
            spare.session.conn.quiet = False  # "* BYE Autologout", or the server closed it
            assert await spares.take(a) is None and spare.session.closed
    assert gate.observer.spares == ["stale", "stale"]


async def test_an_account_changed_or_removed_by_a_reload_gets_no_spare() -> None:
    gate, a, b = Gate(), account(), account("b@example.com")
    async with running(holder(gate, settings(a, b))) as spares:
        for x in (a, b):
            spares.used(x)
            await made(spares, x.key)
        moved = account(imap_server="imap.example.net:993", imap_tls="implicit")
        spares.settings = settings(moved, b)  # as a reload leaves it, before reconfigure
        spare = spares.pool._idle[a.key][0][1]
        assert await spares.take(moved) is None and spare.session.closed
        spares.reconfigure(settings(moved))  # b removed: its spare is closed at once
        assert spares.pool.idle(b.key) == 0
        spares.used(moved)
        await made(spares)
        assert await spares.take(moved) is not None  # made for the new configuration
        spares.used(moved)
        await made(spares)
        spare = spares.pool._idle[a.key][0][1]
        spares.reconfigure(settings(a))  # changed back: closed at the reload, not later
        assert spare.session.closed and spares.pool.idle(a.key) == 0
        spares.used(a)
        await made(spares)
        spares.reconfigure(settings(a, b))  # unchanged: kept
        assert spares.pool.idle(a.key) == 1
    assert gate.observer.spares == ["stale", "hit"]


async def test_a_revoked_grant_gets_no_spare_and_drop_closes_them() -> None:
    gate, a = Gate(), account()
    async with running(holder(gate, settings(a))) as spares:
        spares.used(a)
        await made(spares)
        gate.states[a.key] = TokenState(needs_authorization="invalid_grant")
        assert await spares.take(a) is None
        gate.states[a.key] = TokenState(refresh_token="new")
        spares.used(a)
        await made(spares)
        spare = spares.pool._idle[a.key][0][1]
        spares.drop(a.key)  # the manager said: authorization required
        assert spare.session.closed and spares.pool.idle(a.key) == 0


async def test_a_failed_refill_is_not_retried_until_the_next_login() -> None:
    gate, a = Gate(), account()
    gate.fail = True
    async with running(holder(gate, settings(a))) as spares:
        spares.used(a)
        await made(spares)
        await asyncio.sleep(0.01)
        assert gate.logins == 1 and spares.pool.idle(a.key) == 0
        gate.fail = False
        spares.used(a)
        await made(spares)
        assert gate.logins == 2 and spares.pool.idle(a.key) == 1


async def test_a_login_waits_for_a_spare_being_made_until_its_deadline() -> None:
    gate, a = Gate(), account()
    gate.hold = asyncio.Event()
    async with running(holder(gate, settings(a))) as spares:
        spares.used(a)
        loop = asyncio.get_running_loop()
        # Still being made at the deadline: the client logs in the normal way.
        assert await spares.take(a, loop.time() + 0.05) is None
        taking = asyncio.create_task(spares.take(a, loop.time() + 5))
        await asyncio.sleep(0.01)
        gate.hold.set()
        assert await taking is not None
        # Being made and failing: None at once, not an error.
        gate.hold, gate.fail = asyncio.Event(), True
        spares.used(a)
        taking = asyncio.create_task(spares.take(a, loop.time() + 5))
        await asyncio.sleep(0.01)
        gate.hold.set()
        assert await taking is None
    assert gate.observer.spares == ["miss", "hit", "miss"]


async def test_one_login_waits_for_a_spare_being_made_the_others_go_on() -> None:
    """A client opening several connections at once: one waits for the spare on its way, the
    others log in the normal way at once (they would only find it taken)."""
    gate, a = Gate(), account()
    gate.hold = asyncio.Event()
    async with running(holder(gate, settings(a))) as spares:
        spares.used(a)
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(spares.take(a, loop.time() + 5))
        await asyncio.sleep(0.01)
        async with asyncio.timeout(0.5):  # not held up by the refill
            assert await spares.take(a, loop.time() + 5) is None
        assert not first.done()
        gate.hold.set()
        assert await first is not None
    assert gate.observer.spares == ["miss", "hit"]


async def test_spare_sessions_ready_up_to_the_setting() -> None:
    gate, a = Gate(), account()
    async with running(holder(gate, settings(a, spare_sessions=2))) as spares:
        spares.used(a)
        async with asyncio.timeout(2):
            while spares.pool.idle(a.key) < 2:
                await asyncio.sleep(0)
        await made(spares)
        assert spares.pool.idle(a.key) == 2 and gate.logins == 2  # and no more


async def test_a_login_waits_a_few_seconds_at_most_for_a_spare(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the client's whole login deadline: a refill stuck on a server that does not answer
    would make the client wait for it and then for its own login."""
    monkeypatch.setattr(spare_module, "SPARE_WAIT", 0.05)
    gate, a = Gate(), account()
    gate.hold = asyncio.Event()
    async with running(holder(gate, settings(a))) as spares:
        spares.used(a)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await spares.take(a, loop.time() + 60) is None
        assert loop.time() - started < 1
        gate.hold.set()


async def test_a_login_while_the_daemon_stops_makes_no_spare_and_no_error() -> None:
    gate, a, b = Gate(), account(), account("b@example.com")
    gate.hold = asyncio.Event()
    spares = holder(gate, settings(a, b))
    task = asyncio.create_task(spares.run())
    await asyncio.sleep(0)
    spares.used(a)  # a refill the task group waits for while it shuts down
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0)
    spares.used(b)  # a client login that succeeded meanwhile: no RuntimeError
    gate.hold.set()
    await asyncio.gather(task, return_exceptions=True)
    assert spares.pool.idle(a.key) == spares.pool.idle(b.key) == 0


def test_spare_age_counts_a_suspend() -> None:
    """The pool's clock is CLOCK_BOOTTIME where there is one: it goes on while the machine
    sleeps, unlike ``monotonic``, so a spare made before a suspend is not handed out after."""
    holder_clock = SpareSessions(Gate(), settings()).pool.clock  # type: ignore[arg-type]
    assert holder_clock is boot_clock
    if hasattr(time, "CLOCK_BOOTTIME"):
        assert boot_clock() >= time.clock_gettime(time.CLOCK_MONOTONIC) - 0.001


async def test_dropped_while_being_made_is_not_kept_and_off_makes_none() -> None:
    gate, a = Gate(), account()
    gate.hold = asyncio.Event()
    async with running(holder(gate, settings(a))) as spares:
        spares.used(a)
        await asyncio.sleep(0)
        spares.drop(a.key)  # revoked while the spare was logging in
        gate.hold.set()
        await made(spares)
        assert spares.pool.idle(a.key) == 0
        spares.reconfigure(settings(a, spare_sessions=0))
        spares.used(a)
        assert not spares._making and await spares.take(a) is None
    assert gate.observer.spares == []


async def test_not_running_makes_none_and_shutdown_closes_them() -> None:
    gate, a = Gate(), account()
    spares = holder(gate, settings(a))
    spares.used(a)  # no task group: nothing to own the task, so nothing is started
    assert not spares._making and await spares.take(a) is None
    async with running(spares):
        spares.used(a)
        await made(spares)
        spare = spares.pool._idle[a.key][0][1]
    assert spare.session.closed and spares.pool.idle(a.key) == 0


@pytest.mark.parametrize("value", [-1, 5])
def test_spare_sessions_is_bounded(value: int) -> None:
    with pytest.raises(ValueError):
        ImapListener(spare_sessions=value)
