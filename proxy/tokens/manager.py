"""``TokenManager``: the daemon's one object for access tokens, composing the ``TokenSource``
(get a token now, single flight) with the ``Refresher`` (background refresh, notifications).

Errors are typed: ``AuthorizationRequired`` (a person must act) or ``TokenUnavailable`` (try
later). Callers (the login gate, the daemon, the CLI's ``status``) see this facade only.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import httpx

from ..config import Account, TokenSettings
from .errors import TokenError
from .grants import REFRESH_FLOWS
from .refresher import EventSink, Refresher, refresh_token_deadline
from .source import AccessToken, TokenSource
from .store import TokenStore

__all__ = ["AccessToken", "EventSink", "TokenManager"]


class TokenManager:
    """Hands out access tokens (``get_token``) and keeps them fresh (``run``, in a task group)."""

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
        # One generator for both: the retry and the schedule jitter draw from it in turn.
        rng = rng or random.Random()  # noqa: S311  # jitter, not cryptography
        self._clock = clock
        self.source = TokenSource(accounts, store, settings, clock=clock, sleep=sleep,
                                  transport=transport, rng=rng)
        self.refresher = Refresher(accounts, self.source, settings, clock=clock, sleep=sleep,
                                   rng=rng, events=events, failure_threshold=failure_threshold,
                                   deadline_lead=deadline_lead)
        self.source.notify = self.refresher.queue_event

    async def reconfigure(self, accounts: Sequence[Account], settings: TokenSettings, *,
                          failure_threshold: int, deadline_lead: float) -> None:
        """A reload: accounts added, removed or changed; unchanged ones keep their state,
        their open vault and their refresh schedule."""
        await self.source.reconfigure(accounts, settings)
        self.refresher.reconfigure(accounts, settings, failure_threshold=failure_threshold,
                                   deadline_lead=deadline_lead)

    async def finish_requests(self, timeout: float) -> None:
        """Give token requests on the wire up to ``timeout`` seconds (a rotated refresh token
        must reach the disk), then cancel them."""
        await self.source.finish_requests(timeout)

    def set_event_sink(self, events: EventSink) -> None:
        self.refresher.set_event_sink(events)

    @property
    def clock(self) -> Callable[[], float]:
        """The clock expiry times are measured with (``expires_at - clock()`` = seconds left)."""
        return self._clock

    async def __aenter__(self) -> TokenManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def get_token(
        self, account_key: str, *, force_refresh: bool = False, rejected: str | None = None,
        background: bool = False,
    ) -> AccessToken:
        """A valid access token for the account (KeyError if it is not configured).

        ``rejected``: the token the server just refused; refresh only if that is still the cached
        one, so many sessions reporting the same token cause one request.
        """
        return await self.source.get_token(account_key, force_refresh=force_refresh,
                                           rejected=rejected, background=background)

    def status(self, account_key: str) -> dict[str, object]:
        """What ``mailproxy status`` shows; no secrets."""
        source, refresher = self.source, self.refresher
        account = source.account(account_key)
        try:
            state = source.state(account_key)
        except TokenError as exc:
            return {"account": account.address, "flow": account.flow, "authorized": False,
                    "needs_authorization": exc.reason, "locked": None}
        reason = state.needs_authorization
        if reason is None and not state.locked and account.flow in REFRESH_FLOWS \
                and not state.refresh_token:
            reason = "not authorized yet"
        return {
            "account": account.address,
            "flow": account.flow,
            "authorized": reason is None,
            "needs_authorization": reason,
            "locked": state.locked,
            "access_token_valid": source.cached(state) is not None,
            "expires_at": state.expires_at,
            "last_refresh": state.last_refresh,
            "last_result": source.last_result(account_key),
            "last_error": state.last_error,
            "next_refresh": refresher.due(account_key),
            "refreshing": source.refreshing(account_key),
            "consecutive_failures": refresher.failures(account_key),
            "active": refresher.active(account_key),
            "authorized_at": state.authorized_at,
            "refresh_token_deadline": refresh_token_deadline(account, state),
        }

    def reload(self, account_key: str) -> None:
        """A new grant was stored through this manager's own store (the admin page): re-read
        it at the next use, count the account as in use, forget the old grant's back-off and
        re-plan the background refresh. (The store's change tracking only sees writes by other
        store objects.)"""
        self.source.reload(account_key)
        self.refresher.reset(account_key)
        self.wake()

    def wake(self) -> None:
        """Re-plan the background refresh now (an account was just unlocked)."""
        self.refresher.wake()

    async def run(self) -> None:
        """Refresh tokens ahead of expiry, deliver events, until cancelled."""
        await self.refresher.run()

    async def aclose(self) -> None:
        await self.source.aclose()
