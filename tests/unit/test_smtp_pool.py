"""The per-account pool of logged-in upstream SMTP sessions (relay mode)."""

from __future__ import annotations

from proxy.smtp.pool import SessionPool
from tests.support.clock import ManualClock as Clock


class Session:
    def __init__(self) -> None:
        self.connected = True
        self.closed = False

    def close(self) -> None:
        self.connected = False
        self.closed = True


def test_take_give_expire() -> None:
    clock = Clock(100.0)
    pool: SessionPool[Session] = SessionPool(idle_timeout=60, per_account=2, clock=clock)
    assert pool.take("a") is None and pool.misses == 1
    first, second, third = Session(), Session(), Session()
    pool.give("a", first)
    pool.give("a", second)
    pool.give("a", third)  # over per_account: the oldest is closed
    assert first.closed and pool.idle("a") == 2
    assert pool.take("b") is None  # per account
    assert pool.take("a") is third and pool.hits == 1  # most recently used first
    second.connected = False  # the server closed it meanwhile
    assert pool.take("a") is None and second.closed
    pool.give("a", third)
    clock.now += 61
    assert pool.take("a") is None and third.closed  # idle too long
    fresh = Session()
    pool.give("a", fresh)
    clock.now += 30
    pool.expire()
    assert pool.idle("a") == 1
    clock.now += 31
    pool.expire()
    assert pool.idle("a") == 0 and fresh.closed
    gone = Session()
    gone.connected = False
    pool.give("a", gone)
    assert pool.idle("a") == 0
    kept = Session()
    pool.give("a", kept)
    pool.close()
    assert kept.closed and pool.idle("a") == 0


def test_a_zero_timeout_keeps_nothing() -> None:
    pool: SessionPool[Session] = SessionPool(idle_timeout=0)
    session = Session()
    pool.give("a", session)
    assert session.closed and pool.take("a") is None
