"""TokenManager against a fake token endpoint (httpx.MockTransport), a fake clock and sleep."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from proxy.config import Account, TokenSettings
from proxy.tokens import (
    AuthorizationRequired,
    FileTokenStore,
    StoreLocked,
    TokenState,
    TokenUnavailable,
)
from proxy.tokens.grants import parse_expires_in, parse_retry_after
from proxy.tokens.manager import TokenManager
from tests.support.clock import ManualClock as FakeClock

KEY = "alice@example.com"
T0 = 1_700_000_000.0
SECRET = "s3cret-client-value"


Reply = httpx.Response | Exception | Callable[[dict[str, str]], httpx.Response]


class Endpoint:
    """A token endpoint: answers from `script`, else issues AT-SECRET-n (and RT-SECRET-n+1)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.forms: list[dict[str, str]] = []
        self.headers: list[httpx.Headers] = []
        self.at: list[float] = []
        self.script: deque[Reply] = deque()
        self.rotate = False
        self.expires_in: Any = 3600
        self.gate: asyncio.Event | None = None  # when set, requests wait for it
        self.arrived = asyncio.Event()
        self.issued = 0
        self.on_request: Callable[[dict[str, str]], None] | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        self.forms.append(form)
        self.headers.append(request.headers)
        self.at.append(self.clock())
        self.arrived.set()
        if self.on_request:
            self.on_request(form)
        if self.gate is not None:
            await self.gate.wait()
        if self.script:
            reply = self.script.popleft()
            if isinstance(reply, Exception):
                raise reply
            if isinstance(reply, httpx.Response):
                return reply
            return reply(form)
        self.issued += 1
        body: dict[str, Any] = {"access_token": f"AT-SECRET-{self.issued}", "token_type": "Bearer"}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        if self.rotate:
            body["refresh_token"] = f"RT-SECRET-{self.issued + 1}"
        return httpx.Response(200, json=body)

    async def wait_requests(self, n: int) -> None:
        for _ in range(2000):
            if len(self.forms) >= n:
                return
            await asyncio.sleep(0.001)
        raise AssertionError(f"only {len(self.forms)} requests")


def oauth_error(status: int, error: str, description: str = "") -> httpx.Response:
    return httpx.Response(status, json={"error": error, "error_description": description})


def make_account(**overrides: Any) -> Account:
    fields: dict[str, Any] = {
        "address": "Alice@example.com", "provider": "custom", "client_id": "cid",
        "client_secret": SECRET, "token_url": "https://login.example/token",
        "imap_server": "imap.example:993", "scopes": ["imap", "offline_access"],
    }
    fields.update(overrides)
    return Account(**fields)


@dataclass
class Env:
    tmp: Path
    clock: FakeClock
    endpoint: Endpoint
    store: FileTokenStore
    sleeps: list[float] = field(default_factory=list)
    managers: list[TokenManager] = field(default_factory=list)

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.clock.now += delay
        await asyncio.sleep(0)

    events: list[tuple[str, str, str, float | None]] = field(default_factory=list)

    async def record(self, account: Account, event: str, reason: str,
                     deadline: float | None) -> None:
        self.events.append((account.key, event, reason, deadline))

    def manager(self, account: Account | None = None, *, threshold: int = 3,
                deadline_lead: float = 24 * 3600.0, **settings: Any) -> TokenManager:
        manager = TokenManager(
            [account or make_account()], self.store, TokenSettings(**settings),
            clock=self.clock, sleep=self.sleep, transport=httpx.MockTransport(self.endpoint),
            rng=random.Random(7), events=self.record, failure_threshold=threshold,
            deadline_lead=deadline_lead)
        self.managers.append(manager)
        return manager

    def disk(self) -> TokenState:
        """What another process would read now."""
        return FileTokenStore(self.tmp).load(KEY)

    def cli(self) -> FileTokenStore:
        return FileTokenStore(self.tmp)


@pytest.fixture
async def env(tmp_path: Path) -> Any:
    clock = FakeClock(T0)
    e = Env(tmp_path, clock, Endpoint(clock), FileTokenStore(tmp_path))
    e.store.save(KEY, TokenState(refresh_token="RT-SECRET-1"))
    yield e
    for manager in e.managers:
        await manager.aclose()


# -- requests -----------------------------------------------------------------------------------

async def test_refresh_request_and_cache(env: Env) -> None:
    manager = env.manager()
    token = await manager.get_token(KEY)
    assert (token.value, token.expires_at, token.fresh) == ("AT-SECRET-1", T0 + 3600, True)
    form = env.endpoint.forms[0]
    assert form == {"grant_type": "refresh_token", "refresh_token": "RT-SECRET-1",
                    "scope": "imap offline_access", "client_id": "cid", "client_secret": SECRET}
    assert "authorization" not in env.endpoint.headers[0]  # client_secret_post, not basic
    again = await manager.get_token(KEY)
    assert (again.value, again.fresh) == ("AT-SECRET-1", False)
    assert len(env.endpoint.forms) == 1
    assert "AT-SECRET-1" not in repr(again)
    # Within the safety margin of expiry: a new one.
    env.clock.now = T0 + 3600 - 29
    assert (await manager.get_token(KEY)).value == "AT-SECRET-2"


async def test_public_client_sends_only_client_id(env: Env) -> None:
    await env.manager(make_account(client_secret=None)).get_token(KEY)
    form = env.endpoint.forms[0]
    assert form["client_id"] == "cid" and "client_secret" not in form
    assert "authorization" not in env.endpoint.headers[0]


async def test_force_refresh(env: Env) -> None:
    manager = env.manager()
    await manager.get_token(KEY)
    assert (await manager.get_token(KEY, force_refresh=True)).value == "AT-SECRET-2"


@pytest.mark.parametrize("raw, seconds", [(3599, 3599.0), ("3599", 3599.0), (None, 3600.0),
                                          (-5, 3600.0)])
async def test_expires_in(env: Env, raw: Any, seconds: float) -> None:
    env.endpoint.expires_in = raw
    token = await env.manager().get_token(KEY)
    assert token.expires_at == T0 + seconds


def test_parse_expires_in() -> None:
    # (authlib itself raises on an expires_in int() refuses, so "soon" or "3599.5" never get
    # here from a response: such a response counts as unparsable.)
    assert parse_expires_in({"expires_in": 3599.5}) == 3599.5
    assert parse_expires_in({"expires_in": "soon"}) == 3600.0
    assert parse_expires_in({"expires_in": float("inf")}) == 3600.0
    assert parse_expires_in({"expires_in": True}) == 3600.0
    assert parse_expires_in({}) == 3600.0


# -- single flight ------------------------------------------------------------------------------

async def test_single_flight(env: Env) -> None:
    manager = env.manager()
    env.endpoint.gate = asyncio.Event()
    tasks = [asyncio.create_task(manager.get_token(KEY)) for _ in range(50)]
    await env.endpoint.arrived.wait()
    await asyncio.sleep(0.01)
    env.endpoint.gate.set()
    tokens = await asyncio.gather(*tasks)
    assert {t.value for t in tokens} == {"AT-SECRET-1"}
    assert all(t.fresh for t in tokens)
    assert len(env.endpoint.forms) == 1


async def test_rejected_token_refreshes_once(env: Env) -> None:
    manager = env.manager()
    first = await manager.get_token(KEY)
    env.endpoint.gate = asyncio.Event()
    tasks = [asyncio.create_task(manager.get_token(KEY, rejected=first.value))
             for _ in range(50)]
    await env.endpoint.arrived.wait()
    await asyncio.sleep(0.01)
    env.endpoint.gate.set()
    tokens = await asyncio.gather(*tasks)
    assert {(t.value, t.fresh) for t in tokens} == {("AT-SECRET-2", True)}
    assert len(env.endpoint.forms) == 2
    # A session that saw the old token rejected late gets the new one, no request.
    late = await manager.get_token(KEY, rejected=first.value)
    assert (late.value, late.fresh) == ("AT-SECRET-2", False)
    assert len(env.endpoint.forms) == 2


async def test_cancelled_waiter_does_not_cancel_the_request(env: Env) -> None:
    manager = env.manager()
    env.endpoint.gate = asyncio.Event()
    tasks = [asyncio.create_task(manager.get_token(KEY)) for _ in range(10)]
    await env.endpoint.arrived.wait()
    tasks[0].cancel()
    env.endpoint.gate.set()
    tokens = await asyncio.gather(*tasks[1:])
    assert {t.value for t in tokens} == {"AT-SECRET-1"}
    assert tasks[0].cancelled()
    assert len(env.endpoint.forms) == 1


async def test_all_waiters_gone_rotation_still_saved(env: Env) -> None:
    manager = env.manager()
    env.endpoint.rotate = True
    env.endpoint.gate = asyncio.Event()
    tasks = [asyncio.create_task(manager.get_token(KEY)) for _ in range(3)]
    await env.endpoint.arrived.wait()
    for task in tasks:
        task.cancel()
    env.endpoint.gate.set()
    for _ in range(1000):
        if env.disk().refresh_token == "RT-SECRET-2":
            break
        await asyncio.sleep(0.001)
    assert env.disk().refresh_token == "RT-SECRET-2"
    assert (await manager.get_token(KEY)).value == "AT-SECRET-1"  # cached, no new request
    assert len(env.endpoint.forms) == 1


# -- rotation -----------------------------------------------------------------------------------

async def test_rotated_refresh_token_saved_before_use(env: Env) -> None:
    manager = env.manager()
    env.endpoint.rotate = True
    token = await manager.get_token(KEY)
    disk = env.disk()  # on disk by the time the token is handed out
    assert (disk.refresh_token, disk.access_token) == ("RT-SECRET-2", token.value)
    assert (disk.expires_at, disk.last_refresh, disk.last_error) == (T0 + 3600, T0, None)
    await manager.get_token(KEY, force_refresh=True)
    assert env.endpoint.forms[1]["refresh_token"] == "RT-SECRET-2"
    assert env.disk().refresh_token == "RT-SECRET-3"
    # A restart reuses the saved access token.
    restarted = TokenManager([make_account()], FileTokenStore(env.tmp), TokenSettings(),
                             clock=env.clock, transport=httpx.MockTransport(env.endpoint))
    env.managers.append(restarted)
    assert (await restarted.get_token(KEY)).value == "AT-SECRET-2"
    assert len(env.endpoint.forms) == 2


async def test_token_without_rotation_keeps_refresh_token(env: Env) -> None:
    await env.manager().get_token(KEY)
    assert env.disk().refresh_token == "RT-SECRET-1"


async def test_failed_save_hands_out_nothing(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = env.manager()
    env.endpoint.rotate = True

    def broken(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(env.store, "update", broken)
    with pytest.raises(TokenUnavailable, match="could not save"):
        await manager.get_token(KEY)
    monkeypatch.undo()
    # The rotated refresh token was kept in memory and is used (and saved) next time.
    await manager.get_token(KEY)
    assert env.endpoint.forms[1]["refresh_token"] == "RT-SECRET-2"
    assert env.disk().refresh_token == "RT-SECRET-3"


async def test_store_error_is_a_failed_save(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any store's own error (the vault's subclass StoreError) is handled like a disk error."""
    manager = env.manager()

    def locked(*args: Any) -> None:
        raise StoreLocked("the vault of alice@example.com is locked")

    monkeypatch.setattr(env.store, "update", locked)
    with pytest.raises(TokenUnavailable, match="could not save token state: the vault"):
        await manager.get_token(KEY)
    assert env.disk().access_token is None


async def test_import_while_running_takes_effect(env: Env) -> None:
    manager = env.manager()
    await manager.get_token(KEY)
    env.cli().save(KEY, TokenState(refresh_token="RT-IMPORTED"))  # `mailproxy token import`
    await manager.get_token(KEY)  # the imported state has no access token: refresh with it
    assert env.endpoint.forms[1]["refresh_token"] == "RT-IMPORTED"


async def test_import_during_a_refresh_wins(env: Env) -> None:
    manager = env.manager()
    env.endpoint.rotate = True
    env.endpoint.on_request = lambda form: env.cli().save(
        KEY, TokenState(refresh_token="RT-IMPORTED"))
    token = await manager.get_token(KEY)
    assert token.value == "AT-SECRET-1"  # still usable once
    assert env.disk() == TokenState(refresh_token="RT-IMPORTED")


# -- errors -------------------------------------------------------------------------------------

async def test_invalid_grant_marks_the_account(env: Env) -> None:
    manager = env.manager()
    env.endpoint.script.append(oauth_error(
        400, "invalid_grant", "AADSTS70000: The provided grant has expired due to it being "
        "revoked.\r\nTrace ID: 1"))
    with pytest.raises(AuthorizationRequired) as info:
        await manager.get_token(KEY)
    assert info.value.account == KEY
    assert info.value.reason.startswith("invalid_grant: AADSTS70000: The provided grant")
    assert "\n" not in info.value.reason
    assert env.disk().needs_authorization == info.value.reason
    with pytest.raises(AuthorizationRequired):
        await manager.get_token(KEY)
    assert len(env.endpoint.forms) == 1  # no request for a marked account
    status = manager.status(KEY)
    assert status["authorized"] is False and status["needs_authorization"] == info.value.reason
    # A new sign-in imported by the CLI clears it.
    env.cli().save(KEY, TokenState(refresh_token="RT-NEW"))
    assert (await manager.get_token(KEY)).value == "AT-SECRET-1"
    assert manager.status(KEY)["authorized"] is True
    assert env.disk().needs_authorization is None


@pytest.mark.parametrize("error", ["invalid_client", "unauthorized_client", "invalid_scope"])
async def test_client_errors_are_permanent_but_not_marked(env: Env, error: str) -> None:
    manager = env.manager()
    env.endpoint.script.append(oauth_error(401, error, "check the app registration"))
    with pytest.raises(AuthorizationRequired, match=error):
        await manager.get_token(KEY)
    assert len(env.endpoint.forms) == 1  # not retried
    disk = env.disk()
    assert disk.needs_authorization is None and disk.last_error is not None
    assert disk.last_error.startswith(error)


async def test_error_text_echoing_a_secret_is_scrubbed(env: Env) -> None:
    env.endpoint.script.append(oauth_error(400, "invalid_grant", "bad token RT-SECRET-1"))
    with pytest.raises(AuthorizationRequired) as info:
        await env.manager().get_token(KEY)
    assert "RT-SECRET-1" not in info.value.reason and "[redacted]" in info.value.reason


async def test_no_refresh_token(env: Env) -> None:
    env.store.save(KEY, TokenState())
    with pytest.raises(AuthorizationRequired, match="no refresh token stored"):
        await env.manager().get_token(KEY)
    assert env.endpoint.forms == []


async def test_unknown_account(env: Env) -> None:
    with pytest.raises(KeyError):
        await env.manager().get_token("bob@example.com")


@pytest.mark.parametrize("reply, text", [
    (httpx.Response(503, json={"error": "temporarily_unavailable"}), "HTTP 503"),
    (httpx.Response(502, text="<html>bad gateway</html>"), "HTTP 502"),
    (httpx.Response(429, text="slow down"), "HTTP 429"),
    (httpx.ConnectError("connection refused"), "cannot reach the token endpoint"),
    (httpx.ReadTimeout("timed out"), "timed out"),
    (httpx.Response(200, text="not json"), "could not be parsed"),
    (httpx.Response(200, json={"access_token": "x", "expires_in": "soon"}), "could not be parsed"),
    (httpx.Response(400, text="<html>oops</html>"), "HTTP 400"),
    (httpx.Response(200, json={"token_type": "Bearer"}), "no access_token"),
    (oauth_error(400, "temporarily_unavailable", "busy"), "temporarily_unavailable"),
])
async def test_transient_failures_are_retried(env: Env, reply: Any, text: str) -> None:
    manager = env.manager(retries=3)
    env.endpoint.script.extend([reply] * 4)
    with pytest.raises(TokenUnavailable) as info:
        await manager.get_token(KEY)
    assert text in info.value.reason and "after 4 attempts" in info.value.reason
    assert len(env.endpoint.forms) == 4
    # Exponential back-off with jitter: 1 s, 2 s, 4 s, each times 0.5-1.
    assert len(env.sleeps) == 3
    for delay, base in zip(env.sleeps, [1, 2, 4], strict=True):
        assert base / 2 <= delay <= base
    assert env.disk().last_error == info.value.reason
    assert env.disk().needs_authorization is None
    # And it recovers.
    assert (await manager.get_token(KEY)).value == "AT-SECRET-1"
    assert env.disk().last_error is None


async def test_retry_after_is_honoured(env: Env) -> None:
    env.endpoint.script.append(httpx.Response(429, headers={"Retry-After": "7"}))
    assert (await env.manager().get_token(KEY)).value == "AT-SECRET-1"
    assert env.sleeps == [7.0]


async def test_long_retry_after_gives_up_at_once(env: Env) -> None:
    env.endpoint.script.append(httpx.Response(503, headers={"Retry-After": "120"}))
    with pytest.raises(TokenUnavailable) as info:
        await env.manager().get_token(KEY)
    assert info.value.retry_after == 120.0
    assert env.sleeps == [] and len(env.endpoint.forms) == 1


def test_parse_retry_after() -> None:
    assert parse_retry_after("7", T0) == 7.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:14:00 GMT", 1699999990.0) == 50.0
    assert parse_retry_after("-3", T0) == 0.0
    assert parse_retry_after("whenever", T0) is None
    assert parse_retry_after("nan", T0) is None
    assert parse_retry_after(None, T0) is None


# -- client credentials -------------------------------------------------------------------------

async def test_client_credentials(env: Env) -> None:
    env.store.save(KEY, TokenState())
    account = make_account(flow="client_credentials",
                           scopes=["https://outlook.office365.com/.default"])
    manager = env.manager(account)
    token = await manager.get_token(KEY)
    assert token.value == "AT-SECRET-1"
    assert env.endpoint.forms[0] == {
        "grant_type": "client_credentials", "scope": "https://outlook.office365.com/.default",
        "client_id": "cid", "client_secret": SECRET}
    assert (await manager.get_token(KEY)).fresh is False
    env.clock.now += 3600
    assert (await manager.get_token(KEY)).value == "AT-SECRET-2"
    assert env.disk().refresh_token is None
    env.endpoint.script.append(oauth_error(400, "invalid_grant", "odd"))
    with pytest.raises(AuthorizationRequired):
        await manager.get_token(KEY, force_refresh=True)
    assert env.disk().needs_authorization is None  # no user grant to mark


# -- background refresh -------------------------------------------------------------------------

async def run_until(manager: TokenManager, condition: Callable[[], bool]) -> None:
    task = asyncio.create_task(manager.run())
    # A wall-clock bound, not a count of turns: on a loaded machine the vault's thread hops
    # make each simulated day take longer, but the condition must still be reached.
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            if condition():
                return
            if task.done():
                task.result()
            await asyncio.sleep(0.001)
        raise AssertionError("condition not reached")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_background_refresh_before_expiry_with_jitter(env: Env) -> None:
    env.store.save(KEY, TokenState(refresh_token="RT-SECRET-1", access_token="AT-OLD",
                                   expires_at=T0 + 3600, last_refresh=T0))
    manager = env.manager(refresh_before=300, jitter=60)
    await run_until(manager, lambda: len(env.endpoint.forms) >= 2)
    draws = random.Random(7)
    first = T0 + 3600 - 300 - draws.uniform(0, 60)
    second = first + 3600 - 300 - draws.uniform(0, 60)
    assert env.endpoint.at[:2] == [pytest.approx(first), pytest.approx(second)]
    assert max(env.sleeps) <= 60  # it wakes at least every minute to see store changes
    assert env.disk().access_token is not None


async def test_background_fetches_a_missing_token_at_once(env: Env) -> None:
    manager = env.manager()
    await run_until(manager, lambda: len(env.endpoint.forms) >= 1)
    assert env.endpoint.at[0] == T0


async def test_background_backs_off_after_failures(env: Env) -> None:
    env.endpoint.script.extend([httpx.Response(503)] * 8)
    manager = env.manager(retries=0)
    await run_until(manager, lambda: len(env.endpoint.forms) >= 8)
    gaps = [b - a for a, b in zip(env.endpoint.at, env.endpoint.at[1:8], strict=False)]
    assert gaps == [15, 30, 60, 120, 240, 300, 300]


async def test_background_skips_accounts_needing_authorization(env: Env) -> None:
    env.store.save(KEY, TokenState(refresh_token="RT-SECRET-1", needs_authorization="revoked"))
    manager = env.manager()
    await run_until(manager, lambda: env.clock.now > T0 + 3 * 3600)
    assert env.endpoint.forms == []
    env.cli().save(KEY, TokenState(refresh_token="RT-IMPORTED"))
    await run_until(manager, lambda: len(env.endpoint.forms) >= 1)
    assert env.endpoint.forms[0]["refresh_token"] == "RT-IMPORTED"


async def test_background_and_login_share_the_request(env: Env) -> None:
    env.store.save(KEY, TokenState(refresh_token="RT-SECRET-1", access_token="AT-OLD",
                                   expires_at=T0 + 100, last_refresh=T0 - 3500))
    manager = env.manager(refresh_before=300, jitter=0)
    env.endpoint.gate = asyncio.Event()
    runner = asyncio.create_task(manager.run())
    await env.endpoint.arrived.wait()
    login = asyncio.create_task(manager.get_token(KEY, rejected="AT-OLD"))
    await asyncio.sleep(0.01)
    env.endpoint.gate.set()
    assert (await login).value == "AT-SECRET-1"
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert len(env.endpoint.forms) == 1


async def test_idle_account_is_kept_alive_every_n_days(env: Env) -> None:
    """No client for 6 h: access tokens are no longer refreshed ahead of need, but the refresh
    token is used every `keepalive_days` so it does not die unused."""
    manager = env.manager(refresh_before=300, jitter=0, keepalive_days=7)
    await run_until(manager, lambda: env.clock.now > T0 + 30 * 86400)
    at = env.endpoint.at
    active = [t for t in at if t < T0 + 6 * 3600 + 3600]
    idle = [t for t in at if t >= T0 + 6 * 3600 + 3600]
    assert len(active) == 7  # hourly while the start-up counts as activity
    assert [round((b - a) / 86400, 3) for a, b in itertools.pairwise(idle)] == \
        [7.0, 7.0, 7.0]
    assert idle[0] - active[-1] == pytest.approx(7 * 86400)
    # A client comes back: the token it gets is fresh, and hourly refresh resumes.
    before = len(at)
    token = await manager.get_token(KEY)
    assert len(at) == before + 1 and token.fresh
    await run_until(manager, lambda: len(at) >= before + 3)
    assert at[-1] - at[-2] == pytest.approx(3600 - 300)


async def test_keepalive_zero_leaves_idle_accounts_alone(env: Env) -> None:
    manager = env.manager(refresh_before=300, jitter=0, keepalive_days=0)
    # Past the default keep-alive (7 days) with room to spare; each simulated minute is a turn.
    await run_until(manager, lambda: env.clock.now > T0 + 10 * 86400)
    assert all(t < T0 + 8 * 3600 for t in env.endpoint.at)


async def test_invalid_grant_event_once(env: Env) -> None:
    env.endpoint.script.append(oauth_error(400, "invalid_grant", "AADSTS50173: revoked"))
    manager = env.manager()
    await run_until(manager, lambda: len(env.events) >= 1)
    for _ in range(3):
        with pytest.raises(AuthorizationRequired):
            await manager.get_token(KEY)
    await run_until(manager, lambda: env.clock.now > T0 + 3600)
    assert env.events == [(KEY, "authorization_required", "invalid_grant: AADSTS50173: revoked",
                           None)]


async def test_refresh_failing_after_threshold_then_recovered(env: Env) -> None:
    env.endpoint.script.extend([httpx.Response(503)] * 4)
    manager = env.manager(retries=0, threshold=3)
    await run_until(manager, lambda: len(env.endpoint.forms) >= 5)
    await run_until(manager, lambda: len(env.events) >= 2)
    assert [e[1] for e in env.events] == ["refresh_failing", "recovered"]
    assert "3 background refreshes in a row failed" in env.events[0][2]
    assert "HTTP 503" in env.events[0][2]


async def test_deadline_warning_once_before_a_known_lifetime(env: Env) -> None:
    env.store.save(KEY, TokenState(refresh_token="RT-SECRET-1", authorized_at=T0))
    manager = env.manager(make_account(refresh_token_lifetime_days=7), deadline_lead=86400,
                          keepalive_days=0)
    await run_until(manager, lambda: env.clock.now > T0 + 6.5 * 86400)
    assert [e[1] for e in env.events] == ["deadline_approaching"]
    _, _, reason, deadline = env.events[0]
    assert deadline == T0 + 7 * 86400
    assert "mailproxy authorize Alice@example.com" in reason
    assert manager.status(KEY)["refresh_token_deadline"] == T0 + 7 * 86400


# -- no secrets in logs or status ---------------------------------------------------------------

async def test_no_secret_reaches_the_logs(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    manager = env.manager()
    env.endpoint.rotate = True
    await manager.get_token(KEY)
    env.endpoint.script.extend([httpx.Response(503)] * 4)
    with pytest.raises(TokenUnavailable):
        await manager.get_token(KEY, force_refresh=True)
    env.endpoint.script.append(oauth_error(400, "invalid_grant", "AADSTS50173"))
    with pytest.raises(AuthorizationRequired):
        await manager.get_token(KEY, force_refresh=True)
    status = manager.status(KEY)
    assert "refresh token rotated" in caplog.text
    for secret in ["RT-SECRET", "AT-SECRET", SECRET]:
        assert secret not in caplog.text
        assert secret not in repr(status)


async def test_clock_is_exposed(env: Env) -> None:
    manager = env.manager()
    token = await manager.get_token(KEY)
    assert token.expires_at - manager.clock() == 3600


# -- certificate and service account credentials ------------------------------------------------

def _rsa_files(tmp: Path) -> tuple[Path, Path, Any]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailproxy test app")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_path, key_path = tmp / "app.crt", tmp / "app.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key_pem)
    return cert_path, key_path, key


def _verified_claims(jwt: str, key: Any) -> dict[str, Any]:
    import base64
    import json

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    def unb64(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    header, claims, signature = jwt.split(".")
    key.public_key().verify(unb64(signature), f"{header}.{claims}".encode(),
                            padding.PKCS1v15(), hashes.SHA256())
    return dict(json.loads(unb64(claims)))


async def test_certificate_credential_signs_each_refresh(env: Env) -> None:
    cert, key_file, key = _rsa_files(env.tmp)
    manager = env.manager(make_account(client_secret=None, client_certificate=cert,
                                       client_certificate_key=key_file))
    await manager.get_token(KEY)
    await manager.get_token(KEY, force_refresh=True)
    assertions = []
    for form in env.endpoint.forms:
        assert form["grant_type"] == "refresh_token" and "client_secret" not in form
        assert form["client_assertion_type"] == \
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        claims = _verified_claims(form["client_assertion"], key)
        assert claims["iss"] == claims["sub"] == "cid"
        assert claims["aud"] == "https://login.example/token"
        assertions.append(claims["jti"])
    assert len(set(assertions)) == 2  # never replayed


async def test_service_account_jwt_bearer(env: Env) -> None:
    import json

    from cryptography.hazmat.primitives import serialization

    _, _, key = _rsa_files(env.tmp)
    sa = env.tmp / "sa.json"
    sa.write_text(json.dumps({
        "type": "service_account", "client_email": "robot@project.iam.gserviceaccount.com",
        "private_key_id": "kid1", "token_uri": "https://login.example/token",
        "private_key": key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode()}))
    manager = env.manager(make_account(flow="service_account", client_id="",
                                       client_secret=None, service_account_file=sa,
                                       scopes=["https://mail.google.com/"]))
    token = await manager.get_token(KEY)
    assert token.value == "AT-SECRET-1"
    (form,) = env.endpoint.forms
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    claims = _verified_claims(form["assertion"], key)
    assert claims["iss"] == "robot@project.iam.gserviceaccount.com"
    assert claims["sub"] == "Alice@example.com"
    assert claims["scope"] == "https://mail.google.com/"
    assert "refresh_token" not in form and "client_secret" not in form
