"""The background refresher: refreshes ahead of expiry (with jitter), backs off after failures,
keeps idle refresh tokens alive, and delivers notifications (failing, recovered, deadlines)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from ..config import Account, TokenSettings
from .errors import AuthorizationRequired, TokenError, TokenUnavailable
from .grants import REFRESH_FLOWS
from .source import TokenSource, when
from .store import TokenState

log = logging.getLogger("mailproxy.tokens")

# Background refresh after failures: 15 s, 30 s ... at most 5 min between attempts.
BACKGROUND_BASE = 15.0
BACKGROUND_CAP = 300.0
# The background loop re-reads the store at least this often (imports, cleared marks).
BACKGROUND_POLL = 60.0
# Never refresh one account in the background more often than this (a provider issuing
# very short-lived tokens must not cause a tight loop).
BACKGROUND_MIN_INTERVAL = 10.0
# An account no client asked a token for in this long is idle: its access token is no longer
# refreshed ahead of expiry, only every `keepalive_days` to keep the refresh token alive.
ACTIVE_WINDOW = 6 * 3600.0

# (account, event, reason, deadline): the daemon turns these into notifications.
EventSink = Callable[[Account, str, str, float | None], Awaitable[None]]


@dataclass(eq=False)
class _Schedule:
    """What the refresher keeps per account."""

    account: Account
    # The jitter drawn for the current expiry, and the back-off.
    jitter_for: float | None = None
    jitter: float = 0.0
    not_before: float = 0.0
    failures: int = 0
    next_refresh: float | None = None
    # Notifications waiting for the run loop: (event, reason, deadline).
    events: list[tuple[str, str, float | None]] = field(default_factory=list)
    failing_since: float | None = None
    deadline_queued: float | None = None


def refresh_token_deadline(account: Account, state: TokenState) -> float | None:
    """When the refresh token stops working whatever we do, if the provider says (lifetime)."""
    days = account.refresh_token_lifetime_days
    if days is None or state.authorized_at is None or account.flow not in REFRESH_FLOWS:
        return None
    return state.authorized_at + days * 86400.0


class Refresher:
    """Runs (``run``) next to a ``TokenSource`` and asks it for tokens before clients need them."""

    def __init__(
        self,
        accounts: Sequence[Account],
        source: TokenSource,
        settings: TokenSettings,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        rng: random.Random,
        events: EventSink | None,
        failure_threshold: int,
        deadline_lead: float,
    ) -> None:
        self._schedules = {account.key: _Schedule(account) for account in accounts}
        self._source = source
        self._settings = settings
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._events = events
        self._failure_threshold = failure_threshold
        self._deadline_lead = deadline_lead
        self._wake: asyncio.Event | None = None

    def set_event_sink(self, events: EventSink) -> None:
        self._events = events

    def reconfigure(self, accounts: Sequence[Account], settings: TokenSettings, *,
                    failure_threshold: int, deadline_lead: float) -> None:
        """A reload: schedules of unchanged accounts (back-off, jitter, pending events) stay."""
        schedules = {}
        for account in accounts:
            sched = self._schedules.get(account.key) or _Schedule(account)
            sched.account = account
            schedules[account.key] = sched
        self._schedules = schedules
        self._settings = settings
        self._failure_threshold = failure_threshold
        self._deadline_lead = deadline_lead
        self.wake()

    def wake(self) -> None:
        """Re-plan the background refresh now (an account was just unlocked)."""
        if self._wake is not None:
            self._wake.set()

    def reset(self, account_key: str) -> None:
        """Forget the back-off and failure count (a new grant replaced the failing one)."""
        sched = self._schedules[account_key]
        sched.failures = 0
        sched.not_before = 0.0
        sched.failing_since = None

    def queue_event(self, account_key: str, event: str, reason: str,
                    deadline: float | None = None) -> None:
        """Deliver a notification from the run loop (dropped when there is no sink)."""
        if self._events is None:
            return
        sched = self._schedules.get(account_key)
        if sched is None:
            return  # removed by a reload while its request was in flight
        sched.events.append((event, reason, deadline))
        self.wake()

    # -- what the status shows ------------------------------------------------------------------

    def active(self, account_key: str) -> bool:
        """Whether a client asked for a token lately: then it is refreshed ahead of expiry."""
        return self._clock() - self._source.last_used(account_key) < ACTIVE_WINDOW

    def due(self, account_key: str) -> float | None:
        """When the account should be refreshed next; None: nothing to refresh."""
        sched = self._schedules[account_key]
        try:
            state = self._source.state(account_key)
        except TokenError as exc:
            log.warning("%s: %s", exc.account, exc.reason)
            return None
        flow = sched.account.flow
        if state.needs_authorization or state.locked:
            return None
        if flow in REFRESH_FLOWS and not state.refresh_token:
            return None
        if not self._source.can_keep(account_key):
            return None  # an app-only account without a vault: a token could not be kept
        if not self.active(account_key):
            # Idle: no access token ahead of need, but use the refresh token every
            # `keepalive_days` (Microsoft's die after 90 days unused, Google's after 6 months).
            keepalive = self._settings.keepalive_days * 86400.0
            if flow not in REFRESH_FLOWS or keepalive <= 0:
                return None
            return max((state.last_refresh or 0.0) + keepalive, sched.not_before)
        if not state.access_token or state.expires_at is None:
            return sched.not_before  # nothing cached: get one now (and learn early if it fails)
        if sched.jitter_for != state.expires_at:  # one draw per token, not per wake-up
            sched.jitter_for = state.expires_at
            sched.jitter = self._rng.uniform(0.0, self._settings.jitter)
        lead = self._settings.refresh_before + sched.jitter
        if state.last_refresh is not None:
            # A token living less than the lead is refreshed halfway through its life instead.
            lead = min(lead, (state.expires_at - state.last_refresh) / 2)
        return max(state.expires_at - lead, sched.not_before)

    def failures(self, account_key: str) -> int:
        return self._schedules[account_key].failures

    # -- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Refresh tokens ahead of expiry, deliver events, until cancelled."""
        self._wake = asyncio.Event()
        while True:
            self._wake.clear()
            now = self._clock()
            due: list[_Schedule] = []
            wake = now + BACKGROUND_POLL
            for sched in self._schedules.values():
                self._check_deadline(sched, now)
                at = self.due(sched.account.key)
                sched.next_refresh = at
                if at is None:
                    continue
                if at <= now:
                    due.append(sched)
                else:
                    wake = min(wake, at)
            if due:
                # Concurrently: one slow token endpoint must not delay the other accounts.
                async with asyncio.TaskGroup() as group:
                    for sched in due:
                        group.create_task(self._background_refresh(sched))
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

    async def _deliver_events(self) -> None:
        if self._events is None:
            return
        for sched in self._schedules.values():
            while sched.events:
                event, reason, deadline = sched.events.pop(0)
                try:
                    await self._events(sched.account, event, reason, deadline)
                except Exception:  # a notification must never stop the refresher
                    log.exception("%s: sending the %s notification failed", sched.account.key,
                                  event)

    def _check_deadline(self, sched: _Schedule, now: float) -> None:
        account = sched.account
        state = self._source.last_state(account.key)
        deadline = refresh_token_deadline(account, state)
        if deadline is None or state.needs_authorization:
            return
        if now >= deadline - self._deadline_lead and sched.deadline_queued != deadline:
            sched.deadline_queued = deadline
            left = max(0.0, deadline - now)
            self.queue_event(account.key, "deadline_approaching",
                             f"the refresh token of {account.address} stops working at "
                             f"{when(deadline)} (in {left / 3600:.1f} h): sign in again before "
                             f"then with `mailproxy authorize {account.address}`",
                             deadline)

    async def _background_refresh(self, sched: _Schedule) -> None:
        key = sched.account.key
        try:
            # rejected=: if a login refreshed the token meanwhile, there is nothing to do.
            await self._source.get_token(key, rejected=self._source.last_state(key).access_token,
                                         force_refresh=not self.active(key), background=True)
        except TokenUnavailable as exc:
            sched.failures += 1
            delay = min(BACKGROUND_CAP, BACKGROUND_BASE * 2 ** (sched.failures - 1))
            delay = max(delay, min(exc.retry_after or 0.0, BACKGROUND_CAP))
            sched.not_before = self._clock() + delay
            log.warning("%s: background refresh failed (%s); next try in %.0f s", key,
                        exc.reason, delay)
            if sched.failures == self._failure_threshold:
                sched.failing_since = self._clock()
                self.queue_event(key, "refresh_failing",
                                 f"{sched.failures} background refreshes in a row failed; "
                                 f"last: {exc.reason}")
            return
        except AuthorizationRequired as exc:
            # A marked account is skipped until the store changes; this slow retry is for the
            # unmarked ones (client configuration errors).
            sched.not_before = self._clock() + BACKGROUND_CAP
            log.warning("%s: background refresh stopped: %s", key, exc.reason)
            return
        except Exception:
            # A bug here must not end the refresher (and with it the daemon's task group).
            sched.not_before = self._clock() + BACKGROUND_CAP
            log.exception("%s: background refresh crashed", key)
            return
        if sched.failing_since is not None:
            self.queue_event(key, "recovered", f"refreshing works again after "
                             f"{sched.failures} failures")
            sched.failing_since = None
        sched.failures = 0
        sched.not_before = self._clock() + BACKGROUND_MIN_INTERVAL
