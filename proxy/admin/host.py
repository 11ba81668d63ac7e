"""The adapter between the admin page and the rest of mailproxy: the only module of
``proxy.admin`` that reaches the daemon's objects, the token flows, the vault or the storage
policy of ``mailproxy authorize``. Everything else in the package sees the ``Backend``
interface (``model.py``)."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from ..config import Account, Settings, parse_hostport
from ..queue import admin as queue_admin
from ..tokens.flows import (
    DeviceCode,
    FlowError,
    Grant,
    authorization_url,
    authorize,
    exchange_code,
)
from ..vault import PasswordNeeded, VaultError
from ..vault.policy import grant_fields, store_grant
from .model import (
    AccountView,
    AdminError,
    DeviceCodeView,
    Notice,
    PasswordNeed,
    PasswordView,
    QueuedView,
    SignedIn,
    VaultState,
    free_label,
)

if TYPE_CHECKING:
    from ..login import Gate
    from ..queue.index import Record
    from ..queue.service import QueueService
    from .service import AdminService

log = logging.getLogger("mailproxy.admin")

_PERSISTED_EVENTS = ("authorization_required", "deadline_approaching")


class Daemon(Protocol):
    """What the page takes from the daemon (``proxy.daemon.server.Daemon``)."""

    settings: Settings
    gate: Gate
    started: float
    queue: QueueService | None

    async def status_report(self) -> dict[str, Any]:
        """The control socket's ``status`` answer: one source of truth for both."""
        ...


def admin_service(daemon: Daemon) -> AdminService | None:
    """The admin page for this daemon, or None when ``[admin] listen`` is empty."""
    listen = daemon.settings.admin.listen
    if not listen:
        return None
    from .queueweb import make_app
    from .service import AdminService

    host, port = parse_hostport(listen)
    return AdminService(DaemonBackend(daemon), host, port, app_factory=make_app)


class DaemonBackend:
    """``model.Backend`` on a running daemon's own objects: its token manager, its vault and
    the report its control socket gives (one source of truth)."""

    def __init__(self, daemon: Daemon) -> None:
        from .. import __version__

        self._daemon = daemon
        self._vault = daemon.gate.vault
        self._tokens = daemon.gate.tokens
        self.version = __version__
        self.pid = os.getpid()
        self.started = daemon.started

    @property
    def _settings(self) -> Settings:
        """The daemon's settings now: a reload replaces them."""
        return self._daemon.settings

    def clock(self) -> float:
        return time.time()

    def _account(self, key: str) -> Account:
        account = self._settings.account(key)
        if account is None:
            raise AdminError(f"no account {key!r} in the configuration")
        return account


    # -- the accounts -------------------------------------------------------------------------

    async def accounts(self) -> list[AccountView]:
        report = await self._daemon.status_report()
        views = []
        now = time.time()
        for account, status in zip(self._settings.accounts, report["accounts"], strict=True):
            exists = await asyncio.to_thread(self._vault.exists, account.key)
            views.append(_view(account, status, exists, now))
        return views

    # -- the outbound queue (``proxy.queue.admin`` on the directory, in a thread) -------------

    async def queue(self) -> list[QueuedView] | None:
        directory = self._settings.queue_dir
        if self._daemon.queue is None and not await asyncio.to_thread(
                (directory / "index.sqlite").exists):
            return None
        records = await asyncio.to_thread(queue_admin.list_messages, directory)
        return [_queued(r) for r in records]

    async def queue_retry(self, message_id: str | None, account: str | None) -> int:
        directory = self._settings.queue_dir

        def retry() -> tuple[int, set[str]]:
            records = ([queue_admin.get(directory, message_id)] if message_id is not None
                       else queue_admin.list_messages(directory))
            records = [r for r in records if account is None or r.account == account]
            if message_id is not None and not records:
                raise queue_admin.NoSuchMessage(message_id)
            for record in records:
                queue_admin.retry(directory, record.id)
            return len(records), {r.account for r in records}

        try:
            count, accounts = await asyncio.to_thread(retry)
        except queue_admin.NoSuchMessage as exc:
            raise AdminError(f"{exc}: delivered or deleted meanwhile") from None
        except (OSError, sqlite3.Error) as exc:
            raise AdminError(f"the queue could not be changed: {exc}") from None
        service = self._daemon.queue
        if service is not None:  # the worker may sleep up to a minute otherwise
            for key in accounts:
                service.wake(key)
        if count:
            log.info("admin page: %d queued message(s) made due now", count)
        return count

    async def queue_delete(self, message_id: str) -> QueuedView:
        try:
            record = await asyncio.to_thread(queue_admin.delete, self._settings.queue_dir,
                                             message_id)
        except queue_admin.NoSuchMessage as exc:
            raise AdminError(f"{exc}: delivered or deleted meanwhile") from None
        except (OSError, sqlite3.Error) as exc:
            raise AdminError(f"the queue could not be changed: {exc}") from None
        log.info("admin page: queued message %s of %s deleted", record.id, record.account)
        return _queued(record)

    async def passwords(self, key: str) -> list[PasswordView]:
        account = self._account(key)
        try:
            slots = await asyncio.to_thread(self._vault.slots, account.key)
        except (OSError, ValueError) as exc:
            raise AdminError(f"the vault of {account.address} cannot be read: {exc}") from None
        return [PasswordView(s.label, s.type, s.created) for s in slots]

    async def password_need(self, key: str) -> PasswordNeed:
        return await asyncio.to_thread(self._password_need, self._account(key))

    def _password_need(self, account: Account) -> PasswordNeed:
        vault = self._vault
        if not vault.exists(account.key):
            return "none" if vault.has_master_key else "new"
        return "none" if self._writable(account) else "current"

    def _writable(self, account: Account) -> bool:
        vault = self._vault
        return vault.is_open(account.key) or (vault.has_master_key
                                              and vault.open_with_master(account.key))

    async def add_password(self, key: str, label: str, password: str) -> None:
        account = self._account(key)

        def add() -> None:
            if not self._vault.exists(account.key):
                raise AdminError(f"{account.address} has no vault yet: sign it in first")
            if not self._writable(account):
                raise AdminError(_locked(account))
            self._vault.add_password(account.key, password, label)

        await self._vault_call(add)

    async def remove_password(self, key: str, label: str) -> None:
        account = self._account(key)

        def remove() -> None:
            if not self._writable(account):
                raise AdminError(_locked(account))
            self._vault.remove_slot(account.key, label)

        await self._vault_call(remove)

    @staticmethod
    async def _vault_call(fn: Callable[[], None]) -> None:
        try:
            await asyncio.to_thread(fn)  # scrypt and fsync: never on the loop
        except VaultError as exc:
            raise AdminError(str(exc)) from None
        except OSError as exc:
            raise AdminError(f"the vault could not be written: {exc}") from None

    # -- signing in ---------------------------------------------------------------------------

    def authorization_url(self, key: str, redirect_uri: str, state: str,
                          code_verifier: str) -> str:
        account = self._account(key)
        try:
            return authorization_url(account, redirect_uri, state, code_verifier)
        except FlowError as exc:
            raise AdminError(str(exc)) from None

    async def sign_in_with_code(self, key: str, code: str, redirect_uri: str,
                                code_verifier: str, password: str | None) -> SignedIn:
        account = self._account(key)
        try:
            grant = await exchange_code(account, code, redirect_uri, code_verifier,
                                        request_timeout=self._settings.tokens.request_timeout)
        except FlowError as exc:
            raise AdminError(str(exc)) from None
        return await self._store(account, grant, password)

    async def sign_in_with_device(self, key: str, show: Callable[[DeviceCodeView], None],
                                  password: str | None) -> SignedIn:
        account = self._account(key)
        grant = await self._run_flow(account, _PageConsole(show))
        return await self._store(account, grant, password)

    async def sign_in_app(self, key: str, password: str | None) -> SignedIn:
        account = self._account(key)
        grant = await self._run_flow(account, _PageConsole(lambda _: None))
        return await self._store(account, grant, password)

    async def _run_flow(self, account: Account, console: _PageConsole) -> Grant:
        try:
            return await authorize(account, console,
                                   request_timeout=self._settings.tokens.request_timeout)
        except FlowError as exc:
            raise AdminError(str(exc)) from None

    async def _store(self, account: Account, grant: Grant, password: str | None) -> SignedIn:
        """The grant into the account's vault by ``mailproxy authorize``'s policy
        (``proxy.vault.policy``), then the token manager picks it up and refreshes from now
        on."""
        now = time.time()
        fields = grant_fields(account.flow, grant.access_token, grant.expires_at,
                              grant.refresh_token, now)
        try:
            replaced = await asyncio.to_thread(self._store_blocking, account, password, fields)
        except VaultError as exc:
            raise AdminError(str(exc)) from None
        except OSError as exc:
            raise AdminError(f"the tokens could not be stored: {exc}") from None
        self._tokens.reload(account.key)
        message = f"{account.address} is authorized"
        if grant.expires_at:
            message += f"; access token valid for {max(0, int(grant.expires_at - now))} s"
        log.info("admin page: %s signed in (%s)", account.address, account.flow)
        return SignedIn(message, replaced_passwords=replaced)

    def _store_blocking(self, account: Account, password: str | None,
                        fields: dict[str, Any]) -> int:
        vault, key = self._vault, account.key
        if vault.exists(key) and self._writable(account):
            # Open in this daemon (a client login, or the master key): the CLI, a process of
            # its own, never meets this case.
            if password is not None:
                vault.add_password(key, password, free_label(
                    [s.label for s in vault.slots(key)]))
            vault.update(key, lambda s: replace(s, **fields))
            return 0
        try:
            lost = store_grant(vault, key, password, fields)
        except PasswordNeeded:
            raise AdminError(f"a local password for {account.address} is needed to encrypt "
                             "its tokens") from None
        return len(lost)


class _PageConsole:
    """The flows' ``Console`` for the page: the device code goes to the page, the rest to the
    log (nobody reads a terminal here)."""

    def __init__(self, show: Callable[[DeviceCodeView], None]) -> None:
        self._show = show

    def say(self, text: str) -> None:
        log.debug("sign-in: %s", text.replace("\n", " "))

    def ask(self, prompt: str) -> str:
        raise EOFError  # nothing to paste on the page: the redirect comes to /oauth/callback

    def open_browser(self, url: str) -> bool:
        return False

    def show_device_code(self, code: DeviceCode) -> None:
        self._show(DeviceCodeView(code.user_code, code.verification_uri,
                                  code.verification_uri_complete, code.expires_at))


def _locked(account: Account) -> str:
    return (f"the vault of {account.address} is locked: it opens at the account's first client "
            "login with a local password, or at start-up with [vault] master_key; sign the "
            "account in again here to replace it")


def _vault_state(status: dict[str, Any], exists: bool) -> VaultState:
    if not exists:
        return "missing"
    locked = status.get("locked")
    if locked is None:
        return "unknown"
    return "locked" if locked else "open"


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _queued(record: Record) -> QueuedView:
    return QueuedView(
        id=record.id, account=record.account, sender=record.sender,
        recipients=tuple(record.recipients), size=record.size, received=record.received,
        attempts=record.attempts, next_attempt=record.next_attempt,
        last_error=record.last_error, delivering=record.state == "active",
        dsn=record.kind == "dsn")


def _view(account: Account, status: dict[str, Any], exists: bool, now: float) -> AccountView:
    notices = [Notice(str(k).split(":")[0], float(at))
               for k, at in (status.get("notifications") or {}).items()
               if _number(at) is not None]
    notices += [Notice(str(n["event"]), float(n["at"])) for n in status.get("sent_this_run", [])
                if n.get("event") not in _PERSISTED_EVENTS]
    notices.sort(key=lambda n: n.at)
    queue: dict[str, Any] = status.get("queue") or {}
    oldest_age = _number(queue.get("oldest_age"))
    return AccountView(
        key=account.key, address=account.address, provider=account.provider,
        flow=account.flow, authorized=bool(status.get("authorized")),
        reason=status.get("needs_authorization"), vault=_vault_state(status, exists),
        access_token_valid=bool(status.get("access_token_valid")),
        expires_at=_number(status.get("expires_at")),
        last_refresh=_number(status.get("last_refresh")),
        next_refresh=_number(status.get("next_refresh")),
        refreshing=bool(status.get("refreshing")), last_result=status.get("last_result"),
        last_error=status.get("last_error"), failures=int(status.get("consecutive_failures") or 0),
        passwords=int(status.get("passwords") or 0),
        master_key_slot=bool(status.get("master_key_slot")), notices=tuple(notices),
        queued=int(queue.get("queued") or 0),
        queue_oldest=None if oldest_age is None else now - oldest_age,
        queue_error=queue.get("last_error"))
