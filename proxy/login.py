"""Protocol-independent login: local password, access token, upstream login with one retry.

Each protocol supplies an ``Upstream`` (connect, authenticate with a token) and maps a
``Refusal`` to its own reply (IMAP ``NO [...]``, POP3 ``-ERR [...]``, SMTP ``5xx``/``4xx``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from .config import Account, Settings
from .observe import Observer
from .tokens.errors import AuthorizationRequired, TokenError
from .tokens.manager import AccessToken, TokenManager
from .vault import Vault

log = logging.getLogger("mailproxy.login")

RefusalKind = Literal["credentials", "authorization", "unavailable", "rejected"]


class Refusal(Exception):
    """Why a login is refused, in words for the person at the client."""

    def __init__(self, kind: RefusalKind, text: str) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text


class UpstreamError(Exception):
    """The upstream server cannot be reached or broke the protocol."""


@dataclass(frozen=True)
class UpstreamRejection:
    text: str
    temporary: bool


class Upstream(Protocol):
    description: str  # "imap.gmail.com:993", for messages

    async def connect(self) -> None: ...

    async def authenticate(self, token: str) -> UpstreamRejection | None: ...

    def close(self) -> None: ...


def authorize_hint(account: Account) -> str:
    return f"run `mailproxy authorize {account.address}`"


@dataclass
class Gate:
    settings: Settings
    vault: Vault
    tokens: TokenManager
    observer: Observer = field(default_factory=Observer)

    async def check_password(self, username: str, password: str) -> Account:
        account = self.settings.account(username)
        if account is None:
            raise Refusal("credentials", "Invalid credentials")
        key = account.key
        if not self.vault.exists(key) and not self.vault.has_legacy(key):
            raise Refusal("authorization", f"account {account.address} is not authorized yet: "
                          f"{authorize_hint(account)}")
        was_open = self.vault.is_open(key)
        if not await self.vault.unlock(key, password):
            raise Refusal("credentials", "Invalid credentials")
        if not was_open:
            log.info("token vault of %s opened by a client login", account.address)
            self.tokens.wake()  # background refresh can start for this account
        return account

    async def log_in(self, proto: str, username: str, password: str,
                     make_upstream: Callable[[Account], Upstream]) -> tuple[Account, Upstream]:
        """Check the local password, then log in upstream; raise ``Refusal`` if anything fails."""
        started = time.monotonic()
        try:
            account = await self.check_password(username, password)
        except Refusal as refusal:
            log.warning("%s login refused for %r: %s", proto, username, refusal.text)
            self.observer.login(proto, refusal.kind, time.monotonic() - started)
            raise
        upstream = make_upstream(account)
        try:
            await self.relogin(account, upstream)
        except Refusal as refusal:
            log.warning("%s login for %s refused: %s", proto, account.address, refusal.text)
            self.observer.login(proto, refusal.kind, time.monotonic() - started)
            raise
        self.observer.login(proto, "ok", time.monotonic() - started)
        log.info("%s login for %s via %s in %.1f ms", proto, account.address,
                 upstream.description, (time.monotonic() - started) * 1000)
        return account, upstream

    async def relogin(self, account: Account, upstream: Upstream) -> None:
        """Log ``upstream`` in for a client whose local password is already checked (also
        SMTP's reconnect between messages); closes it and raises ``Refusal`` on failure."""
        if self.settings.account(account.key) is None:
            upstream.close()  # removed by a reload: its sessions end at their next login
            raise Refusal("credentials", f"account {account.address} is no longer configured")
        try:
            await self._upstream_login(account, upstream)
        except BaseException:
            upstream.close()
            raise

    async def _upstream_login(self, account: Account, upstream: Upstream) -> None:
        # Connect while the token is fetched: a login waits for the slower of the two only.
        connecting = asyncio.create_task(upstream.connect())
        try:
            token = await self._token(account)
            await connecting
        except UpstreamError as exc:
            raise Refusal("unavailable", f"cannot reach {upstream.description}: {exc}; "
                          "try again later") from None
        finally:
            if not connecting.done():
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
        rejection = await self._authenticate(upstream, token.value)
        if rejection is not None and not rejection.temporary and not token.fresh:
            # The server refused a token we thought valid (revoked, clock skew): refresh once.
            log.info("%s refused the cached token for %s; refreshing", upstream.description,
                     account.address)
            token = await self._token(account, rejected=token.value)
            rejection = await self._authenticate(upstream, token.value)
        if rejection is None:
            return
        if rejection.temporary:
            raise Refusal("unavailable", f"{upstream.description} is temporarily unavailable: "
                          f"{rejection.text}")
        raise Refusal("rejected", f"{upstream.description} refused a freshly refreshed token "
                      f"for {account.address} ({rejection.text}); check that the mailbox allows "
                      "this protocol and the app has the right scopes")

    async def _authenticate(self, upstream: Upstream, token: str) -> UpstreamRejection | None:
        rejection = await upstream.authenticate(token)
        result = "ok" if rejection is None else "temporary" if rejection.temporary \
            else "rejected"
        mechanism = str(getattr(upstream, "mechanism", None) or "unknown").lower()
        self.observer.upstream_auth(getattr(upstream, "proto", "unknown"), mechanism, result)
        return rejection

    async def _token(self, account: Account, rejected: str | None = None) -> AccessToken:
        try:
            return await self.tokens.get_token(account.key, rejected=rejected)
        except AuthorizationRequired as exc:
            raise Refusal("authorization", f"account {account.address} is not authorized: "
                          f"{exc.reason}; {authorize_hint(account)}") from None
        except TokenError as exc:
            raise Refusal("unavailable", f"cannot get an access token for {account.address}: "
                          f"{exc.reason}; try again later") from None
