"""Access tokens for the upstream logins.

One ``TokenManager`` per daemon. It hands out the cached access token while it is valid, makes at
most one token request per account at a time however many sessions ask (single flight), saves a
rotated refresh token before the new access token is used, and refreshes ahead of expiry in the
background (``run``). Errors are typed: ``AuthorizationRequired`` (a person must act) or
``TokenUnavailable`` (try later).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from ..config import Account, TokenSettings
from .errors import AuthorizationRequired, TokenError, TokenUnavailable
from .store import TokenState, TokenStore
from .vault import VaultError

with warnings.catch_warnings():
    # authlib 1.9 prefers the new "httpx2" package and warns on every start when it falls back to
    # httpx, which is what we pin. Its deprecate module installs an "always" filter on import, so
    # import it first and put ours in front.
    import authlib.deprecate  # type: ignore[import-untyped]  # noqa: F401

    warnings.filterwarnings("ignore", message="The httpx module is deprecated")
    from authlib.integrations.httpx_client import (  # type: ignore[import-untyped]
        AsyncOAuth2Client,
        OAuthError,
    )

if not issubclass(AsyncOAuth2Client, httpx.AsyncClient):
    # With httpx2 installed authlib silently switches to it; then our transports and the httpx
    # exceptions caught below would no longer match what it raises.
    raise ImportError("authlib is using the 'httpx2' package; mailproxy is built on 'httpx'")

log = logging.getLogger("mailproxy.tokens")

# A token handed out stays valid at least this long: enough for the upstream login it is for.
SAFETY_MARGIN = 30.0
DEFAULT_EXPIRES_IN = 3600.0
# Retries inside one token request: 1 s, 2 s, 4 s ... (times 0.5-1 jitter), at most 30 s.
RETRY_BASE = 1.0
RETRY_CAP = 30.0
# A longer Retry-After ends the retries at once: a login should not hang on it.
RETRY_AFTER_MAX = 30.0
# Background refresh after failures: 15 s, 30 s ... at most 5 min between attempts.
BACKGROUND_BASE = 15.0
BACKGROUND_CAP = 300.0
# The background loop re-reads the store at least this often (imports, cleared marks).
BACKGROUND_POLL = 60.0
# Never refresh one account in the background more often than this (a provider issuing
# very short-lived tokens must not cause a tight loop).
BACKGROUND_MIN_INTERVAL = 10.0
_REASON_MAX = 400

_REFRESH_FLOWS = frozenset({"authorization_code", "device_code"})
# OAuth error codes that a retry may cure.
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})
# Errors tied to the user's grant, kept in the store until a new sign-in. invalid_client and
# unauthorized_client are not: they are fixed in the configuration, and a mark would survive
# that fix and the restart after it.
_MARKING_ERRORS = frozenset({"invalid_grant", "interaction_required", "consent_required"})
# An account no client asked a token for in this long is idle: its access token is no longer
# refreshed ahead of expiry, only every `keepalive_days` to keep the refresh token alive.
ACTIVE_WINDOW = 6 * 3600.0
LOCKED_REASON = ("the token vault is locked: it opens at the first client login with a local "
                 "password, or at start-up with [vault] master_key")

# (account, event, reason, deadline): the daemon turns these into notifications.
EventSink = Callable[[Account, str, str, float | None], Awaitable[None]]


@dataclass(frozen=True)
class AccessToken:
    value: str = field(repr=False)
    expires_at: float
    # True when a token request completed during this call: if the server rejects this token,
    # asking again would not help.
    fresh: bool


class _Transient(Exception):
    """One failed attempt worth retrying."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Refused(Exception):
    """The token endpoint answered with an OAuth error that a retry will not cure."""

    def __init__(self, code: str, description: str | None) -> None:
        super().__init__(code)
        self.code = code
        self.description = description


@dataclass(eq=False)
class _Slot:
    """Everything the manager keeps per account."""

    account: Account
    state: TokenState = field(default_factory=TokenState)
    loaded: bool = False
    # The refresh token in the store as last read or written by us. It differs from
    # state.refresh_token only after a failed save; a different one on disk means an import.
    disk_refresh: str | None = None
    task: asyncio.Task[AccessToken] | None = None  # the one token request in flight
    client: Any = None  # AsyncOAuth2Client, made on first use
    # Background schedule: the jitter drawn for the current expiry, and the back-off.
    jitter_for: float | None = None
    jitter: float = 0.0
    not_before: float = 0.0
    failures: int = 0
    # When a client last asked for a token (or the daemon started): active accounts are kept
    # refreshed ahead of expiry.
    last_used: float = 0.0
    last_result: str | None = None
    next_refresh: float | None = None
    # Notifications waiting for the run loop: (event, reason, deadline).
    events: list[tuple[str, str, float | None]] = field(default_factory=list)
    failing_since: float | None = None
    deadline_queued: float | None = None


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def parse_expires_in(token: dict[str, Any]) -> float:
    """Seconds the access token lives: ``expires_in`` (a number or numeric string), else 3600."""
    raw = token.get("expires_in")
    if raw is None or isinstance(raw, bool):
        return DEFAULT_EXPIRES_IN
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return DEFAULT_EXPIRES_IN
    return value if math.isfinite(value) and value >= 0 else DEFAULT_EXPIRES_IN


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from ``now``: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


class TokenManager:
    def __init__(
        self,
        accounts: Sequence[Account],
        store: TokenStore,
        settings: TokenSettings,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        events: EventSink | None = None,
        failure_threshold: int = 3,
        deadline_lead: float = 24 * 3600.0,
    ) -> None:
        now = clock()
        self._slots = {account.key: _Slot(account, last_used=now) for account in accounts}
        self._store = store
        self._settings = settings
        self._clock = clock
        self._sleep = sleep
        self._transport = transport
        self._rng = rng or random.Random()  # noqa: S311  # jitter, not cryptography
        self._events = events
        self._failure_threshold = failure_threshold
        self._deadline_lead = deadline_lead
        self._wake: asyncio.Event | None = None

    def set_event_sink(self, events: EventSink) -> None:
        self._events = events

    @property
    def clock(self) -> Callable[[], float]:
        """The clock expiry times are measured with (``expires_at - clock()`` = seconds left)."""
        return self._clock

    async def __aenter__(self) -> TokenManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the API for sessions -------------------------------------------------------------------

    async def get_token(
        self, account_key: str, *, force_refresh: bool = False, rejected: str | None = None,
        background: bool = False,
    ) -> AccessToken:
        """A valid access token for the account (KeyError if it is not configured).

        ``rejected``: the token the server just refused; refresh only if that is still the cached
        one, so many sessions reporting the same token cause one request.
        """
        slot = self._slot(account_key)
        state = self._sync(slot)
        if state.needs_authorization:
            raise AuthorizationRequired(account_key, state.needs_authorization)
        if state.locked:
            raise TokenUnavailable(account_key, LOCKED_REASON)
        if not background:
            slot.last_used = self._clock()
        if not force_refresh:
            cached = self._cached(state)
            if cached is not None and cached.value != rejected:
                return cached
        task = slot.task
        if task is None:
            task = self._start(slot)
        # shield: a caller that gives up (client gone, timeout) must not cancel the request the
        # others wait for, nor lose a rotated refresh token that is on its way.
        return await asyncio.shield(task)

    def status(self, account_key: str) -> dict[str, object]:
        """What ``mailproxy status`` shows; no secrets."""
        slot = self._slot(account_key)
        account = slot.account
        try:
            state = self._sync(slot)
        except TokenError as exc:
            return {"account": account.address, "flow": account.flow, "authorized": False,
                    "needs_authorization": exc.reason, "locked": None}
        reason = state.needs_authorization
        if reason is None and not state.locked and account.flow in _REFRESH_FLOWS \
                and not state.refresh_token:
            reason = "not authorized yet"
        return {
            "account": account.address,
            "flow": account.flow,
            "authorized": reason is None,
            "needs_authorization": reason,
            "locked": state.locked,
            "access_token_valid": self._cached(state) is not None,
            "expires_at": state.expires_at,
            "last_refresh": state.last_refresh,
            "last_result": slot.last_result,
            "last_error": state.last_error,
            "next_refresh": self._due(slot),
            "refreshing": slot.task is not None,
            "consecutive_failures": slot.failures,
            "active": self._active(slot),
            "authorized_at": state.authorized_at,
            "refresh_token_deadline": self._deadline(slot, state),
        }

    def wake(self) -> None:
        """Re-plan the background refresh now (an account was just unlocked)."""
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Refresh tokens ahead of expiry, deliver events, until cancelled."""
        self._wake = asyncio.Event()
        while True:
            self._wake.clear()
            now = self._clock()
            due: list[_Slot] = []
            wake = now + BACKGROUND_POLL
            for slot in self._slots.values():
                self._check_deadline(slot, now)
                when = self._due(slot)
                slot.next_refresh = when
                if when is None:
                    continue
                if when <= now:
                    due.append(slot)
                else:
                    wake = min(wake, when)
            if due:
                # Concurrently: one slow token endpoint must not delay the other accounts.
                async with asyncio.TaskGroup() as group:
                    for slot in due:
                        group.create_task(self._background_refresh(slot))
            await self._deliver_events()
            if due:
                continue
            await self._nap(wake - now)

    async def _nap(self, seconds: float) -> None:
        assert self._wake is not None
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)

    def _queue_event(self, slot: _Slot, event: str, reason: str,
                     deadline: float | None = None) -> None:
        if self._events is None:
            return
        slot.events.append((event, reason, deadline))
        self.wake()

    async def _deliver_events(self) -> None:
        if self._events is None:
            return
        for slot in self._slots.values():
            while slot.events:
                event, reason, deadline = slot.events.pop(0)
                try:
                    await self._events(slot.account, event, reason, deadline)
                except Exception:  # a notification must never stop the refresher
                    log.exception("%s: sending the %s notification failed", slot.account.key,
                                  event)

    def _deadline(self, slot: _Slot, state: TokenState) -> float | None:
        days = slot.account.refresh_token_lifetime_days
        if days is None or state.authorized_at is None or slot.account.flow not in \
                _REFRESH_FLOWS:
            return None
        return state.authorized_at + days * 86400.0

    def _check_deadline(self, slot: _Slot, now: float) -> None:
        state = slot.state
        deadline = self._deadline(slot, state)
        if deadline is None or state.needs_authorization:
            return
        if now >= deadline - self._deadline_lead and slot.deadline_queued != deadline:
            slot.deadline_queued = deadline
            left = max(0.0, deadline - now)
            self._queue_event(slot, "deadline_approaching",
                              f"the refresh token of {slot.account.address} stops working at "
                              f"{_when(deadline)} (in {left / 3600:.1f} h): sign in again before "
                              f"then with `mailproxy authorize {slot.account.address}`",
                              deadline)

    async def aclose(self) -> None:
        tasks = [slot.task for slot in self._slots.values() if slot.task is not None]
        if tasks:
            # A request already sent may be answered with a rotated refresh token that has to
            # reach the disk: give it its time before cancelling.
            await asyncio.wait(tasks, timeout=self._settings.request_timeout)
            for task in tasks:
                task.cancel()
        for slot in self._slots.values():
            if slot.client is not None:
                await slot.client.aclose()
                slot.client = None

    # -- state --------------------------------------------------------------------------------

    def _slot(self, account_key: str) -> _Slot:
        try:
            return self._slots[account_key]
        except KeyError:
            raise KeyError(f"unknown account {account_key!r}") from None

    def _sync(self, slot: _Slot) -> TokenState:
        """The account's state, re-read if another process (``token import``) wrote it."""
        key = slot.account.key
        try:
            # `loaded`: the store's change tracking is per store object, and someone else may
            # have used this one before us.
            # A locked state is re-read each time: a client login may have opened the vault.
            if not slot.loaded or slot.state.locked or self._store.changed(key):
                slot.state = self._store.load(key)
                slot.loaded = True
                slot.disk_refresh = slot.state.refresh_token
        except ValueError as exc:  # a damaged file: a new import replaces it
            raise AuthorizationRequired(key, f"token store unreadable: {exc}") from None
        except OSError as exc:
            raise TokenUnavailable(key, f"token store unreadable: {exc}") from None
        return slot.state

    def _cached(self, state: TokenState) -> AccessToken | None:
        if state.access_token and state.expires_at is not None:
            if state.expires_at - SAFETY_MARGIN > self._clock():
                return AccessToken(state.access_token, state.expires_at, fresh=False)
        return None

    async def _commit(self, slot: _Slot, fn: Callable[[TokenState], TokenState]) -> TokenState:
        # In a thread: fsync and the cross-process lock may take a while.
        slot.state = await asyncio.to_thread(self._store.update, slot.account.key, fn)
        slot.disk_refresh = slot.state.refresh_token
        return slot.state

    # -- the single flight ----------------------------------------------------------------------

    def _start(self, slot: _Slot) -> asyncio.Task[AccessToken]:
        task = asyncio.get_running_loop().create_task(
            self._refresh(slot), name=f"token request {slot.account.key}")
        slot.task = task
        task.add_done_callback(functools.partial(self._finished, slot))
        return task

    @staticmethod
    def _finished(slot: _Slot, task: asyncio.Task[AccessToken]) -> None:
        if slot.task is task:
            slot.task = None
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone; _refresh logged it

    async def _refresh(self, slot: _Slot) -> AccessToken:
        account = slot.account
        key = account.key
        state = self._sync(slot)
        if state.needs_authorization:
            raise AuthorizationRequired(key, state.needs_authorization)
        if state.locked:
            raise TokenUnavailable(key, LOCKED_REASON)
        base = slot.disk_refresh
        used: str | None = None
        if account.flow in _REFRESH_FLOWS:
            if not state.refresh_token:
                raise AuthorizationRequired(key, "no refresh token stored")
            used = state.refresh_token
        grant = "refresh_token" if used else account.flow

        try:
            token = await self._request_with_retries(slot, used)
        except _Refused as exc:
            reason = self._scrub(slot, f"{exc.code}: {exc.description}" if exc.description
                                 else exc.code)
            log.warning("%s: %s grant refused: %s", key, grant, reason)
            mark = used is not None and exc.code in _MARKING_ERRORS
            await self._note_failure(slot, base, reason, mark=mark)
            slot.last_result = f"refused: {reason}"
            if mark:
                self._queue_event(slot, "authorization_required", reason)
            raise AuthorizationRequired(key, reason) from None
        except TokenUnavailable as exc:
            log.warning("%s: %s grant failed: %s", key, grant, exc.reason)
            await self._note_failure(slot, base, exc.reason, mark=False)
            slot.last_result = f"failed: {exc.reason}"
            raise

        now = self._clock()
        access: str = token["access_token"]
        expires_at = now + parse_expires_in(token)
        new_refresh = token.get("refresh_token") or used
        rotated = used is not None and new_refresh != used

        def apply(disk: TokenState) -> TokenState:
            if disk.refresh_token != base:
                # A `token import` replaced the grant while we asked: the newer sign-in wins,
                # and this access token is still good to use once.
                return disk
            return replace(disk, refresh_token=new_refresh, access_token=access,
                           expires_at=expires_at, needs_authorization=None,
                           last_refresh=now, last_error=None)

        try:
            # Rotation: the new refresh token is on disk before the access token is used. If
            # Microsoft rotated it and we crashed after using the access token, the user would
            # have to sign in again.
            await self._commit(slot, apply)
        except (OSError, ValueError, VaultError) as exc:
            # Keep the rotated refresh token in memory (the old one may be dead now) but hand out
            # nothing unsaved: the next request rotates again and retries the save.
            if rotated:
                slot.state = replace(slot.state, refresh_token=new_refresh, access_token=None)
            log.error("%s: could not save token state: %s", key, exc)
            raise TokenUnavailable(key, f"could not save token state: {exc}") from None
        log.info("%s: %s grant ok, access token valid until %s%s", key, grant, _when(expires_at),
                 ", refresh token rotated" if rotated else "")
        slot.last_result = "ok" + (", refresh token rotated" if rotated else "")
        return AccessToken(access, expires_at, fresh=True)

    async def _note_failure(self, slot: _Slot, base: str | None, reason: str, *,
                            mark: bool) -> None:
        def apply(disk: TokenState) -> TokenState:
            if mark and disk.refresh_token == base:  # not if an import replaced it meanwhile
                return replace(disk, needs_authorization=reason, last_error=reason)
            return replace(disk, last_error=reason)

        try:
            await self._commit(slot, apply)
        except (OSError, ValueError, VaultError) as exc:
            log.error("%s: could not record the failure in the token store: %s",
                      slot.account.key, exc)
            if mark:  # still stop asking the provider until the store changes
                slot.state = replace(slot.state, needs_authorization=reason)

    # -- one token request ----------------------------------------------------------------------

    async def _request_with_retries(self, slot: _Slot, used: str | None) -> dict[str, Any]:
        attempts = self._settings.retries + 1
        for attempt in range(attempts):
            try:
                return await self._request(slot, used)
            except _Transient as exc:
                failure = exc
            retry_after = failure.retry_after
            if attempt + 1 == attempts or (retry_after or 0.0) > RETRY_AFTER_MAX:
                break
            delay = min(RETRY_CAP, RETRY_BASE * 2**attempt) * self._rng.uniform(0.5, 1.0)
            delay = max(delay, retry_after or 0.0)
            log.info("%s: token request failed (%s), retrying in %.1f s", slot.account.key,
                     failure.reason, delay)
            await self._sleep(delay)
        reason = self._scrub(slot, f"{failure.reason} (after {attempt + 1} attempts)")
        raise TokenUnavailable(slot.account.key, reason, retry_after=failure.retry_after)

    async def _request(self, slot: _Slot, used: str | None) -> dict[str, Any]:
        # Here, not at the top: flows imports this module's helpers.
        from .flows import FlowError, app_token_form, client_auth_params

        client = self._client(slot)
        account = slot.account
        url = account.token_url or ""
        try:
            # A certificate credential signs a fresh client assertion per request; a secret
            # goes in by authlib's client_secret_post.
            if used is not None:
                extra = client_auth_params(account, url, now=self._clock()) \
                    if account.client_certificate else {}
                token = await client.refresh_token(url, refresh_token=used, **extra)
            elif account.client_certificate or account.flow == "service_account":
                form = app_token_form(account, now=self._clock())
                form.pop("client_id", None)  # authlib adds it
                token = await client.fetch_token(url, **form)
            else:
                token = await client.fetch_token(url, grant_type="client_credentials")
        except FlowError as exc:  # an unreadable key or certificate file
            raise _Refused("invalid_client", str(exc)) from None
        except OAuthError as exc:
            code = str(exc.error or "oauth_error")
            description = " ".join(str(exc.description or "").split())[:_REASON_MAX] or None
            if code in _TRANSIENT_ERRORS:
                raise _Transient(f"token endpoint error {code}: {description}") from None
            raise _Refused(code, description) from None
        except httpx.HTTPStatusError as exc:  # authlib: an error status without a JSON body
            raise _Transient(f"token endpoint answered HTTP {exc.response.status_code} "
                             "without an OAuth error") from None
        except httpx.TimeoutException:
            raise _Transient("token endpoint timed out") from None
        except httpx.HTTPError as exc:
            raise _Transient(f"cannot reach the token endpoint: {type(exc).__name__}: {exc}"
                             ) from None
        except ValueError:
            # authlib: a 2xx body that is not a JSON object, or an expires_in int() refuses.
            raise _Transient("token endpoint response could not be parsed") from None
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            raise _Transient("token endpoint response has no access_token")
        return dict(token)

    def _client(self, slot: _Slot) -> Any:
        if slot.client is None:
            account = slot.account
            secret = account.client_secret.get_secret_value() if account.client_secret else None
            slot.client = AsyncOAuth2Client(
                # A service account identifies itself by the signed assertion alone.
                client_id=account.client_id or None,
                client_secret=secret,
                # Both providers take client_secret_post; public clients send only client_id.
                token_endpoint_auth_method="client_secret_post" if secret else "none",
                scope=" ".join(account.scopes or ()) or None,
                timeout=self._settings.request_timeout,
                transport=self._transport,
            )
            for hook in ("access_token_response", "refresh_token_response"):
                slot.client.register_compliance_hook(hook, self._check_status)
        return slot.client

    def _check_status(self, response: httpx.Response) -> httpx.Response:
        # Before authlib parses the body: it would turn a 429 or 503 carrying a JSON error into
        # an OAuthError and drop the Retry-After header.
        status = response.status_code
        if status in (408, 429) or status >= 500:
            retry_after = parse_retry_after(response.headers.get("retry-after"), self._clock())
            raise _Transient(f"token endpoint answered HTTP {status}", retry_after)
        return response

    def _scrub(self, slot: _Slot, text: str) -> str:
        # Belt and braces: an error text echoing a secret must not reach a log or a client.
        secrets = [slot.state.refresh_token, slot.state.access_token]
        if slot.account.client_secret:
            secrets.append(slot.account.client_secret.get_secret_value())
        for secret in secrets:
            if secret and len(secret) >= 8:
                text = text.replace(secret, "[redacted]")
        return text

    # -- background refresh ---------------------------------------------------------------------

    def _active(self, slot: _Slot) -> bool:
        return self._clock() - slot.last_used < ACTIVE_WINDOW

    def _due(self, slot: _Slot) -> float | None:
        """When the account should be refreshed next; None: nothing to refresh."""
        try:
            state = self._sync(slot)
        except TokenError as exc:
            log.warning("%s: %s", exc.account, exc.reason)
            return None
        flow = slot.account.flow
        if state.needs_authorization or state.locked:
            return None
        if flow in _REFRESH_FLOWS and not state.refresh_token:
            return None
        if not self._active(slot):
            # Idle: no access token ahead of need, but use the refresh token every
            # `keepalive_days` (Microsoft's die after 90 days unused, Google's after 6 months).
            keepalive = self._settings.keepalive_days * 86400.0
            if flow not in _REFRESH_FLOWS or keepalive <= 0:
                return None
            return max((state.last_refresh or 0.0) + keepalive, slot.not_before)
        if not state.access_token or state.expires_at is None:
            return slot.not_before  # nothing cached: get one now (and learn early if it fails)
        if slot.jitter_for != state.expires_at:  # one draw per token, not per wake-up
            slot.jitter_for = state.expires_at
            slot.jitter = self._rng.uniform(0.0, self._settings.jitter)
        lead = self._settings.refresh_before + slot.jitter
        if state.last_refresh is not None:
            # A token living less than the lead is refreshed halfway through its life instead.
            lead = min(lead, (state.expires_at - state.last_refresh) / 2)
        return max(state.expires_at - lead, slot.not_before)

    async def _background_refresh(self, slot: _Slot) -> None:
        key = slot.account.key
        try:
            # rejected=: if a login refreshed the token meanwhile, there is nothing to do.
            await self.get_token(key, rejected=slot.state.access_token,
                                 force_refresh=not self._active(slot), background=True)
        except TokenUnavailable as exc:
            slot.failures += 1
            delay = min(BACKGROUND_CAP, BACKGROUND_BASE * 2 ** (slot.failures - 1))
            delay = max(delay, min(exc.retry_after or 0.0, BACKGROUND_CAP))
            slot.not_before = self._clock() + delay
            log.warning("%s: background refresh failed (%s); next try in %.0f s", key,
                        exc.reason, delay)
            if slot.failures == self._failure_threshold:
                slot.failing_since = self._clock()
                self._queue_event(slot, "refresh_failing",
                                  f"{slot.failures} background refreshes in a row failed; "
                                  f"last: {exc.reason}")
            return
        except AuthorizationRequired as exc:
            # A marked account is skipped until the store changes; this slow retry is for the
            # unmarked ones (client configuration errors).
            slot.not_before = self._clock() + BACKGROUND_CAP
            log.warning("%s: background refresh stopped: %s", key, exc.reason)
            return
        except Exception:
            # A bug here must not end the refresher (and with it the daemon's task group).
            slot.not_before = self._clock() + BACKGROUND_CAP
            log.exception("%s: background refresh crashed", key)
            return
        if slot.failing_since is not None:
            self._queue_event(slot, "recovered", f"refreshing works again after "
                              f"{slot.failures} failures")
            slot.failing_since = None
        slot.failures = 0
        slot.not_before = self._clock() + BACKGROUND_MIN_INTERVAL
