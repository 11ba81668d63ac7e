"""Protocol-independent login: local password, access token, upstream login with one retry.

Each protocol supplies an ``Upstream`` (connect, authenticate with a token) and maps a
``Refusal`` to its own reply (IMAP ``NO [...]``, POP3 ``-ERR [...]``, SMTP ``5xx``/``4xx``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from . import logs
from .config import Account, Settings
from .net import client_tls_context, describe_error, out_of_resources
from .observe import Observer
from .penalty import Penalty
from .tokens.errors import AuthorizationRequired, TokenError
from .tokens.manager import AccessToken, TokenManager
from .vault import Vault, VaultBusy, VaultError

log = logging.getLogger("mailproxy.login")

# "misconfigured": permanent and not the password's fault; the text names the setting to change.
RefusalKind = Literal["credentials", "authorization", "unavailable", "rejected", "misconfigured"]


class Refusal(Exception):
    """Why a login is refused, in words for the person at the client."""

    def __init__(self, kind: RefusalKind, text: str) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text


class UpstreamError(Exception):
    """The upstream server cannot be reached or broke the protocol; ``fix`` (a sentence naming
    the setting to change) when it cannot do what the account needs, so retrying is useless."""

    def __init__(self, text: str, fix: str | None = None) -> None:
        super().__init__(text)
        self.fix = fix


@dataclass(frozen=True)
class UpstreamRejection:
    text: str
    temporary: bool


class Upstream(Protocol):
    description: str  # "imap.gmail.com:993", for messages

    async def connect(self) -> None: ...

    async def authenticate(self, token: str) -> UpstreamRejection | None: ...

    def close(self) -> None: ...


class Spares(Protocol):
    """Logged-in upstream sessions made ahead of an account's next client login
    (``sessions.spare.SpareSessions``)."""

    async def take(self, account: Account, deadline: float | None) -> Upstream | None:
        """A logged-in session of ``account`` ready for a client whose password is checked,
        or None; waits for one being made until ``deadline`` (loop time) at most."""
        ...

    def used(self, account: Account) -> None:
        """A client of ``account`` logged in: make a spare for the next one."""
        ...


def authorize_hint(account: Account) -> str:
    return f"run `mailproxy authorize {account.address}`"


def setting_fix(account: Account, proto: str, lacks: str) -> str:
    """The sentence naming the setting to change when the server lacks what we need."""
    where = f"account {account.address}"
    if lacks == "starttls":
        return (f"the server will not do STARTTLS; set {proto}_tls = \"implicit\" and its TLS "
                f"port in {proto}_server for {where}")
    if account.sasl_mechanism != "auto":
        return (f"sasl_mechanism = \"{account.sasl_mechanism}\" is set for {where}; set it to "
                "\"auto\" or to a mechanism the server offers")
    return (f"point {proto}_server of {where} at a server that accepts OAuth2 (XOAUTH2 or "
            "OAUTHBEARER)")


LOCAL_SHORTAGE = "mailproxy is short of local resources ({}); try again later"


def local_shortage(exc: OSError) -> Refusal:
    """The temporary refusal of a login that ran out of file descriptors or memory here."""
    return Refusal("unavailable", LOCAL_SHORTAGE.format((exc.strerror or str(exc)).lower()))


def upstream_tls(account: Account) -> ssl.SSLContext:
    """The client TLS context for the account's servers; ``Refusal`` when it cannot be made
    (out of file descriptors: temporary; an unusable ``ca_file``: the setting to fix)."""
    try:
        return client_tls_context(account.ca_file)
    except OSError as exc:
        if out_of_resources(exc):
            raise local_shortage(exc) from None
        raise Refusal("misconfigured", f"the ca_file of account {account.address} cannot be "
                      f"used ({describe_error(exc)}); fix it or remove the setting") from None


@dataclass
class Gate:
    settings: Settings
    vault: Vault
    tokens: TokenManager
    observer: Observer = field(default_factory=Observer)

    def __post_init__(self) -> None:
        self.penalty = Penalty(self.settings.auth)
        # Per account: when a client login last failed to get a token (monotonic).
        self._token_failed: dict[str, float] = {}

    async def check_password(self, username: str, password: str) -> Account:
        """The account if ``password`` opens its vault. Unknown users cost the same work as
        known ones, and "not authorized" is said only where no password can be checked."""
        name = username.casefold()
        account = self.settings.account(username)
        if self.penalty.account_blocked(name) and (
                account is None or not self.vault.verified(account.key, password)):
            raise Refusal("unavailable", "too many failed logins for this account; try again "
                          "later")
        if account is None:
            await self.vault.dummy_check(password)
            raise Refusal("credentials", "Invalid credentials")
        key = account.key
        try:
            if not self.vault.exists(key) and not self.vault.has_legacy(key):
                # No vault: no password can be right, and the person setting up needs to know.
                await self.vault.dummy_check(password)
                raise Refusal("authorization", f"account {account.address} is not authorized "
                              f"yet: {authorize_hint(account)}")
            was_open = self.vault.is_open(key)
            opened = await self.vault.unlock(key, password)
        except VaultBusy as exc:
            raise Refusal("unavailable", f"{exc}; try again later") from None
        except (ValueError, VaultError) as exc:
            log.error("account %s: token vault unusable: %s", account.address, exc)
            raise Refusal("misconfigured", f"the token vault of {account.address} is unusable "
                          "(see the mailproxy log); restore it or run `mailproxy authorize "
                          f"{account.address} --replace`") from None
        except PermissionError as exc:  # e.g. a vault written by root for a daemon user
            log.error("the token vault of %s cannot be read: %s", account.address, exc)
            raise Refusal("unavailable", f"the token vault of {account.address} cannot be read "
                          "by mailproxy; ask its administrator (the daemon's log says why)"
                          ) from None
        except OSError as exc:
            if not out_of_resources(exc):  # that one is said by the refusal's log line
                log.error("account %s: cannot read the token vault: %s", account.address, exc)
            raise local_shortage(exc) from None
        if not opened:
            raise Refusal("credentials", "Invalid credentials")
        if not was_open:
            log.info("token vault of %s opened by a client login", account.address)
            self.tokens.wake()  # background refresh can start for this account
        return account

    async def authenticate(self, proto: str, username: str, password: str, *,
                           peer: str = "unknown") -> Account:
        """The local password check of a client login, with the failure delay and limits per
        ``peer`` (the client's address) and the log line fail2ban reads."""
        started = time.monotonic()
        known = self.settings.account(username)
        try:
            if known is not None and self.vault.verified(known.key, password):
                # A password that already opened the vault: no guess, nothing to slow down.
                account = await self.check_password(username, password)
            else:
                if self.penalty.peer_blocked(peer):
                    raise Refusal("unavailable", "too many failed logins from this address; "
                                  "try again later")
                async with self.penalty.turn(peer):
                    try:
                        account = await self.check_password(username, password)
                    except Refusal as refusal:
                        if refusal.kind == "credentials":
                            self.penalty.failed(peer, username.casefold())
                        raise
        except Refusal as refusal:
            # "(credentials)": a wrong password or an unknown user, what fail2ban counts.
            log.warning("%s login from %s refused for %r (%s): %s", proto, peer, username,
                        refusal.kind, refusal.text)
            self.observer.login(proto, refusal.kind, time.monotonic() - started)
            raise
        self.penalty.succeeded(peer)
        logs.account.set(account.address)  # on the session's lines from here on
        return account

    async def log_in(self, proto: str, username: str, password: str,
                     make_upstream: Callable[[Account], Upstream], *,
                     peer: str = "unknown", spares: Spares | None = None,
                     deadline: float | None = None) -> tuple[Account, Upstream]:
        """Check the local password, then log in upstream; raise ``Refusal`` if anything fails.
        ``peer``: the client's address, for the failure delay and the log; ``spares``: where
        a logged-in upstream session may be ready (taken only once the password is checked,
        waited for until ``deadline``, loop time, if one is being made)."""
        started = time.monotonic()
        account = await self.authenticate(proto, username, password, peer=peer)
        spare = await spares.take(account, deadline) if spares is not None else None
        try:
            upstream = spare
            if upstream is None:
                upstream = make_upstream(account)
                await self.relogin(account, upstream)
        except Refusal as refusal:
            log.warning("%s login for %s from %s refused: %s", proto, account.address, peer,
                        refusal.text)
            self.observer.login(proto, refusal.kind, time.monotonic() - started)
            raise
        self.observer.login(proto, "ok", time.monotonic() - started)
        log.info("%s login for %s from %s via %s%s in %.1f ms", proto, account.address, peer,
                 upstream.description, " (spare)" if spare is not None else "",
                 (time.monotonic() - started) * 1000)
        if spares is not None:
            spares.used(account)
        return account, upstream

    async def relogin(self, account: Account, upstream: Upstream, *,
                      spare: bool = False) -> None:
        """Log ``upstream`` in for a client whose local password is already checked (also
        SMTP's reconnect between messages); closes it and raises ``Refusal`` on failure.
        ``spare``: made ahead of a client (``Spares``); its failure to get a token is not
        remembered against the account's client logins."""
        if self.settings.account(account.key) is None:
            upstream.close()  # removed by a reload: its sessions end at their next login
            raise Refusal("credentials", f"account {account.address} is no longer configured")
        try:
            await self._upstream_login(account, upstream, spare)
        except BaseException:
            upstream.close()
            raise

    async def _upstream_login(self, account: Account, upstream: Upstream,
                              spare: bool = False) -> None:
        # Connect while the token is fetched: a login waits for the slower of the two only.
        connecting = asyncio.create_task(upstream.connect())
        try:
            token = await self._token(account, remember=not spare)
            await connecting
        except UpstreamError as exc:
            if exc.fix is not None:
                raise Refusal("misconfigured", f"{upstream.description}: {exc}; "
                              f"{exc.fix}") from None
            raise Refusal("unavailable", f"cannot reach {upstream.description}: {exc}; "
                          "try again later") from None
        finally:
            # Also when the token failed first: a connect that failed meanwhile is retrieved
            # here, not reported later as "Task exception was never retrieved".
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
        rejection = await self._authenticate(upstream, token.value)
        if rejection is not None and not rejection.temporary and not token.fresh:
            # The server refused a token we thought valid (revoked, clock skew): refresh once.
            log.info("%s refused the cached token for %s; refreshing", upstream.description,
                     account.address)
            token = await self._token(account, rejected=token.value, remember=not spare)
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

    async def _token(self, account: Account, rejected: str | None = None, *,
                     remember: bool = True) -> AccessToken:
        # The token endpoint failed a login recently and a request is still trying (the
        # login's, with its retries, or the background refresher's): answer at once unless a
        # token is at hand. Nothing in flight: this login tries once more, within its deadline.
        # ``remember`` False (a spare being made): neither answered at once nor remembered.
        settings = self.settings.tokens
        failed = self._token_failed.get(account.key)
        recent = remember and failed is not None \
            and time.monotonic() - failed < settings.failure_memory \
            and self.tokens.source.refreshing(account.key)
        try:
            async with asyncio.timeout(0 if recent else settings.login_timeout):
                token = await self.tokens.get_token(account.key, rejected=rejected)
        except TimeoutError:
            if remember and not recent:
                self._token_failed[account.key] = time.monotonic()
                log.warning("%s: no access token within %.0f s; while the request is still "
                            "trying, logins are answered \"try again later\" at once",
                            account.address, settings.login_timeout)
            raise Refusal("unavailable", f"cannot get an access token for {account.address}: "
                          "the token endpoint is not answering; try again later") from None
        except TokenError as exc:
            if remember and not isinstance(exc, AuthorizationRequired):
                self._token_failed[account.key] = time.monotonic()
            raise self._token_refusal(account, exc) from None
        self._token_failed.pop(account.key, None)
        return token

    def _token_refusal(self, account: Account, exc: TokenError) -> Refusal:
        if isinstance(exc, AuthorizationRequired):
            return Refusal("authorization", f"account {account.address} is not authorized: "
                           f"{exc.reason}; {authorize_hint(account)}")
        return Refusal("unavailable", f"cannot get an access token for {account.address}: "
                       f"{exc.reason}; try again later")
