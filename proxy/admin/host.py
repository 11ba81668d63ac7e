"""The adapter between the admin page and the rest of mailproxy: the only module of
``proxy.admin`` that reaches the daemon's objects, the token flows, the vault, the sign-in lock
and the storage policy of ``mailproxy authorize``, or the TLS certificates. Everything else in
the package sees the ``Backend`` interface (``model.py``); ``convert.py`` turns the records it
gets into the page's views.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from ..config import Account, Settings, parse_hostport
from ..queue import admin as queue_admin
from ..tls.contexts import following_context
from ..tls.show import ShowError, export_ca, summaries
from ..tokens.flows import (
    DeviceCode,
    FlowError,
    Grant,
    authorization_url,
    authorize,
    exchange_code,
)
from ..vault import PasswordNeeded, VaultError, signin
from ..vault.policy import grant_fields, store_grant
from . import convert
from .model import (
    AccountView,
    AdminError,
    DeviceCodeView,
    PasswordNeed,
    PasswordView,
    QueuedView,
    SignedIn,
    TlsView,
    free_label,
)

if TYPE_CHECKING:
    from ..config import TlsVersion
    from ..login import Gate
    from ..queue.service import QueueService
    from ..tls.contexts import ServerTls
    from .service import AdminService

log = logging.getLogger("mailproxy.admin")


class Daemon(Protocol):
    """What the page takes from the daemon (``proxy.daemon.server.Daemon``)."""

    settings: Settings
    gate: Gate
    started: float
    queue: QueueService | None
    tls: ServerTls

    async def status_report(self) -> dict[str, Any]:
        """The control socket's ``status`` answer: one source of truth for both."""
        ...


# The oldest TLS version the admin page accepts (browsers all speak 1.2); the daemon's
# ``ServerTls`` must build a context for it.
ADMIN_TLS_VERSION: TlsVersion = "1.2"


def admin_service(daemon: Daemon) -> AdminService | None:
    """The admin page for this daemon, or None when ``[admin] listen`` is empty. Over TLS it
    serves the listeners' certificate, and a replaced one from the next connection on."""
    settings = daemon.settings.admin
    if not settings.listen:
        return None
    from .app import make_app
    from .service import AdminService

    host, port = parse_hostport(settings.listen)
    context = None
    if settings.use_tls:  # the daemon's contexts of the moment (a reload may replace them)
        context = following_context(lambda: daemon.tls.current(ADMIN_TLS_VERSION),
                                    ADMIN_TLS_VERSION)
    return AdminService(DaemonBackend(daemon), host, port, app_factory=make_app,
                        ssl_context=context)


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
            views.append(convert.account_view(account, status, exists, now))
        return views

    # -- the sign-in lock (``proxy.vault.signin``, shared with ``mailproxy authorize``) ------

    async def hold_sign_in(self, key: str) -> signin.SignInLock:
        account = self._account(key)
        take = functools.partial(signin.take, self._settings.state_dir, account.key, "admin")
        # A future, not a task: if this request is cancelled meanwhile, a lock the thread got
        # anyway is released instead of being held until the daemon stops.
        future = asyncio.get_running_loop().run_in_executor(None, take)
        try:
            return await asyncio.shield(future)
        except signin.SignInBusy as exc:
            raise AdminError(_busy(account, exc.holder)) from None
        except OSError as exc:
            raise AdminError(f"the sign-in lock of {account.address} cannot be taken: "
                             f"{exc}") from None
        except asyncio.CancelledError:
            future.add_done_callback(_release_taken)
            raise

    # -- TLS (``proxy.tls.show``, as `mailproxy tls info` and `tls export-ca`) ---------------

    async def tls(self) -> TlsView:
        settings = self._settings
        generated = settings.tls.cert_file is None
        try:
            found = await asyncio.to_thread(summaries, settings)
        except ShowError as exc:
            return TlsView(generated, error=str(exc))
        return TlsView(generated, tuple(convert.certificate(s) for s in found))

    async def local_ca(self) -> str:
        try:
            return await asyncio.to_thread(export_ca, self._settings)
        except ShowError as exc:
            raise AdminError(str(exc)) from None

    # -- the outbound queue (``proxy.queue.admin`` on the directory, in a thread) -------------

    async def queue(self) -> list[QueuedView] | None:
        directory = self._settings.queue_dir
        if self._daemon.queue is None and not await asyncio.to_thread(
                (directory / "index.sqlite").exists):
            return None
        records = await asyncio.to_thread(queue_admin.list_messages, directory)
        return [convert.queued(r) for r in records]

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
        return convert.queued(record)

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


def _release_taken(future: asyncio.Future[signin.SignInLock]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().release()


def _busy(account: Account, holder: signin.Holder) -> str:
    pid = holder.pid or "?"
    if holder.who == "admin" and holder.this_process:
        return (f"a sign-in of {account.address} from this page is still under way; finish it "
                "or cancel it on this page, then try again")
    if holder.who == "admin":
        return (f"the admin page of another mailproxy daemon (pid {pid}) is signing "
                f"{account.address} in; finish it there first")
    return (f"`mailproxy authorize {account.address}` is running (pid {pid}); finish or stop "
            "it first, then try again here")


def _locked(account: Account) -> str:
    return (f"the vault of {account.address} is locked: it opens at the account's first client "
            "login with a local password, or at start-up with [vault] master_key; sign the "
            "account in again here to replace it")
