""""Get me a token now": the cached access token while it is valid, else one token request per
account at a time however many sessions ask (single flight), saved before it is handed out."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import httpx

from ..config import Account, TokenSettings
from .endpoint import TokenEndpoint
from .errors import AuthorizationRequired, TokenUnavailable
from .grants import MARKING_ERRORS, REFRESH_FLOWS, Refused, parse_expires_in
from .store import StoreError, TokenState, TokenStore

log = logging.getLogger("mailproxy.tokens")

# A token handed out stays valid at least this long: enough for the upstream login it is for.
SAFETY_MARGIN = 30.0
LOCKED_REASON = ("the token vault is locked: it opens at the first client login with a local "
                 "password, or at start-up with [vault] master_key")

# (account key, event, reason): a notification for the refresher's queue.
Notify = Callable[[str, str, str], None]
# (account address, grant, result: ok, transient or permanent): a token request's outcome.
Outcome = Callable[[str, str, str], None]


@dataclass(frozen=True)
class AccessToken:
    value: str = field(repr=False)
    expires_at: float
    # True when a token request completed during this call: if the server rejects this token,
    # asking again would not help.
    fresh: bool


def when(epoch: float) -> str:
    """An epoch time for a log line or a notification."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


@dataclass(eq=False)
class _Entry:
    """What the source keeps per account."""

    account: Account
    endpoint: TokenEndpoint
    state: TokenState = field(default_factory=TokenState)
    loaded: bool = False
    # The refresh token in the store as last read or written by us. It differs from
    # state.refresh_token only after a failed save; a different one on disk means an import.
    disk_refresh: str | None = None
    task: asyncio.Task[AccessToken] | None = None  # the one token request in flight
    # When a client last asked for a token (or the daemon started).
    last_used: float = 0.0
    last_result: str | None = None


class TokenSource:
    """Access tokens on demand for the configured accounts, from ``store`` and the endpoints."""

    def __init__(
        self,
        accounts: Sequence[Account],
        store: TokenStore,
        settings: TokenSettings,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        transport: httpx.AsyncBaseTransport | None,
        rng: random.Random,
    ) -> None:
        now = clock()

        def endpoint(account: Account, settings: TokenSettings) -> TokenEndpoint:
            return TokenEndpoint(account, settings, clock=clock, sleep=sleep, rng=rng,
                                 transport=transport)

        self._endpoint = endpoint
        self._entries = {
            account.key: _Entry(account, endpoint(account, settings), last_used=now)
            for account in accounts
        }
        # Endpoints of changed or removed accounts whose request was in flight at a reload.
        self._retired: list[tuple[asyncio.Task[AccessToken] | None, TokenEndpoint]] = []
        self._store = store
        self._settings = settings
        self._clock = clock
        # Told when a refusal marks an account as needing a new sign-in.
        self.notify: Notify | None = None
        self.outcome: Outcome | None = None

    async def get_token(
        self, account_key: str, *, force_refresh: bool = False, rejected: str | None = None,
        background: bool = False,
    ) -> AccessToken:
        """A valid access token for the account (KeyError if it is not configured).

        ``rejected``: the token the server just refused; refresh only if that is still the cached
        one, so many sessions reporting the same token cause one request. ``background``: the
        refresher asks, not a client, so the account does not count as in use.
        """
        entry = self._entry(account_key)
        state = self._sync(entry)
        if state.needs_authorization:
            raise AuthorizationRequired(account_key, state.needs_authorization)
        if state.locked:
            raise TokenUnavailable(account_key, LOCKED_REASON)
        if not background:
            entry.last_used = self._clock()
        if not force_refresh:
            cached = self.cached(state)
            if cached is not None and cached.value != rejected:
                return cached
        task = entry.task
        if task is None:
            task = self._start(entry)
        # shield: a caller that gives up (client gone, timeout) must not cancel the request the
        # others wait for, nor lose a rotated refresh token that is on its way.
        return await asyncio.shield(task)

    # -- what the refresher and the status read ------------------------------------------------

    def account(self, account_key: str) -> Account:
        return self._entry(account_key).account

    def state(self, account_key: str) -> TokenState:
        """The account's state, re-read if another process (``token import``) wrote it.

        Raises ``AuthorizationRequired`` (damaged file) or ``TokenUnavailable`` (I/O error)."""
        return self._sync(self._entry(account_key))

    def can_keep(self, account_key: str) -> bool:
        """Whether a token fetched now could be stored (the account's vault exists)."""
        exists = getattr(self._store, "exists", None)
        return exists is None or bool(exists(account_key))

    def last_state(self, account_key: str) -> TokenState:
        """The state as last read or written, without looking at the store."""
        return self._entry(account_key).state

    def cached(self, state: TokenState) -> AccessToken | None:
        """The access token in ``state`` if it is still good for a login."""
        if state.access_token and state.expires_at is not None:
            if state.expires_at - SAFETY_MARGIN > self._clock():
                return AccessToken(state.access_token, state.expires_at, fresh=False)
        return None

    def last_used(self, account_key: str) -> float:
        return self._entry(account_key).last_used

    def last_result(self, account_key: str) -> str | None:
        return self._entry(account_key).last_result

    def refreshing(self, account_key: str) -> bool:
        return self._entry(account_key).task is not None

    async def reconfigure(self, accounts: Sequence[Account], settings: TokenSettings) -> None:
        """A reload: add and drop accounts, give changed ones a new endpoint. Unchanged ones
        (and the state of changed ones) are not touched; a request in flight finishes on the
        endpoint it started with."""
        wanted = {account.key: account for account in accounts}
        retire: list[_Entry] = []
        for key in list(self._entries):
            if key not in wanted:
                retire.append(self._entries.pop(key))
        for key, account in wanted.items():
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = _Entry(account, self._endpoint(account, settings),
                                            last_used=self._clock())
            elif entry.account != account or settings != self._settings:
                self._retired.append((entry.task, entry.endpoint))
                entry.account = account
                entry.endpoint = self._endpoint(account, settings)
        self._retired += [(entry.task, entry.endpoint) for entry in retire]
        self._settings = settings
        keep: list[tuple[asyncio.Task[AccessToken] | None, TokenEndpoint]] = []
        for task, endpoint in self._retired:
            if task is None or task.done():
                await endpoint.aclose()
            else:
                keep.append((task, endpoint))
        self._retired = keep

    def reload(self, account_key: str) -> None:
        """Re-read the account's state at the next use, and count it as in use now."""
        entry = self._entry(account_key)
        entry.loaded = False
        entry.last_used = self._clock()

    async def aclose(self) -> None:
        await self.finish_requests(self._settings.request_timeout)
        for entry in self._entries.values():
            await entry.endpoint.aclose()
        for _, endpoint in self._retired:
            await endpoint.aclose()

    async def finish_requests(self, timeout: float) -> None:
        """Let token requests on the wire finish for up to ``timeout`` seconds, then cancel."""
        tasks = [entry.task for entry in self._entries.values() if entry.task is not None]
        tasks += [task for task, _ in self._retired if task is not None and not task.done()]
        if tasks:
            # A request already sent may be answered with a rotated refresh token that has to
            # reach the disk: give it its time before cancelling.
            await asyncio.wait(tasks, timeout=max(timeout, 0.001))
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- state --------------------------------------------------------------------------------

    def _entry(self, account_key: str) -> _Entry:
        try:
            return self._entries[account_key]
        except KeyError:
            raise KeyError(f"unknown account {account_key!r}") from None

    def _sync(self, entry: _Entry) -> TokenState:
        key = entry.account.key
        try:
            # `loaded`: the store's change tracking is per store object, and someone else may
            # have used this one before us.
            # A locked state is re-read each time: a client login may have opened the vault.
            if not entry.loaded or entry.state.locked or self._store.changed(key):
                entry.state = self._store.load(key)
                entry.loaded = True
                entry.disk_refresh = entry.state.refresh_token
        except ValueError as exc:  # a damaged file: a new import replaces it
            raise AuthorizationRequired(key, f"token store unreadable: {exc}") from None
        except OSError as exc:
            raise TokenUnavailable(key, f"token store unreadable: {exc}") from None
        return entry.state

    async def _commit(self, entry: _Entry, fn: Callable[[TokenState], TokenState]) -> TokenState:
        # In a thread: fsync and the cross-process lock may take a while.
        entry.state = await asyncio.to_thread(self._store.update, entry.account.key, fn)
        entry.disk_refresh = entry.state.refresh_token
        return entry.state

    # -- the single flight ----------------------------------------------------------------------

    def _start(self, entry: _Entry) -> asyncio.Task[AccessToken]:
        task = asyncio.get_running_loop().create_task(
            self._refresh(entry), name=f"token request {entry.account.key}")
        entry.task = task
        task.add_done_callback(functools.partial(self._finished, entry))
        return task

    @staticmethod
    def _finished(entry: _Entry, task: asyncio.Task[AccessToken]) -> None:
        if entry.task is task:
            entry.task = None
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone; _refresh logged it

    async def _refresh(self, entry: _Entry) -> AccessToken:
        account = entry.account
        key = account.key
        state = self._sync(entry)
        if state.needs_authorization:
            raise AuthorizationRequired(key, state.needs_authorization)
        if state.locked:
            raise TokenUnavailable(key, LOCKED_REASON)
        base = entry.disk_refresh
        used: str | None = None
        if account.flow in REFRESH_FLOWS:
            if not state.refresh_token:
                raise AuthorizationRequired(key, "no refresh token stored")
            used = state.refresh_token
        grant = "refresh_token" if used else account.flow

        try:
            token = await entry.endpoint.request(used, functools.partial(self._scrub, entry))
        except Refused as exc:
            reason = self._scrub(entry, f"{exc.code}: {exc.description}" if exc.description
                                 else exc.code)
            log.warning("%s: %s grant refused: %s", key, grant, reason)
            mark = used is not None and exc.code in MARKING_ERRORS
            await self._note_failure(entry, base, reason, mark=mark)
            entry.last_result = f"refused: {reason}"
            self._report(account, grant, "permanent")
            if mark and self.notify is not None:
                self.notify(key, "authorization_required", reason)
            raise AuthorizationRequired(key, reason) from None
        except TokenUnavailable as exc:
            log.warning("%s: %s grant failed: %s", key, grant, exc.reason)
            await self._note_failure(entry, base, exc.reason, mark=False)
            entry.last_result = f"failed: {exc.reason}"
            self._report(account, grant, "transient")
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
            await self._commit(entry, apply)
        except (OSError, ValueError, StoreError) as exc:
            # Keep the rotated refresh token in memory (the old one may be dead now) but hand out
            # nothing unsaved: the next request rotates again and retries the save.
            if rotated:
                entry.state = replace(entry.state, refresh_token=new_refresh, access_token=None)
            log.error("%s: could not save token state: %s", key, exc)
            self._report(account, grant, "transient")
            raise TokenUnavailable(key, f"could not save token state: {exc}") from None
        log.info("%s: %s grant ok, access token valid until %s%s", key, grant, when(expires_at),
                 ", refresh token rotated" if rotated else "")
        entry.last_result = "ok" + (", refresh token rotated" if rotated else "")
        self._report(account, grant, "ok")
        return AccessToken(access, expires_at, fresh=True)

    async def _note_failure(self, entry: _Entry, base: str | None, reason: str, *,
                            mark: bool) -> None:
        def apply(disk: TokenState) -> TokenState:
            if mark and disk.refresh_token == base:  # not if an import replaced it meanwhile
                return replace(disk, needs_authorization=reason, last_error=reason)
            return replace(disk, last_error=reason)

        try:
            await self._commit(entry, apply)
        except (OSError, ValueError, StoreError) as exc:
            log.error("%s: could not record the failure in the token store: %s",
                      entry.account.key, exc)
            if mark:  # still stop asking the provider until the store changes
                entry.state = replace(entry.state, needs_authorization=reason)

    def _report(self, account: Account, grant: str, result: str) -> None:
        if self.outcome is not None:
            self.outcome(account.address, grant, result)

    def _scrub(self, entry: _Entry, text: str) -> str:
        # Belt and braces: an error text echoing a secret must not reach a log or a client.
        secrets = [entry.state.refresh_token, entry.state.access_token]
        if entry.account.client_secret:
            secrets.append(entry.account.client_secret.get_secret_value())
        for secret in secrets:
            if secret and len(secret) >= 8:
                text = text.replace(secret, "[redacted]")
        return text
