"""Run the real proxy daemon inside a test's event loop, wired to the test servers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.config import (
    Account,
    AdminSettings,
    ImapListener,
    Pop3Listener,
    Settings,
    SmtpListener,
    TokenSettings,
)
from proxy.daemon.server import Daemon
from proxy.tokens.store import TokenState
from proxy.vault import Vault
from tests.support.dovecot import Dovecot
from tests.support.tokenserver import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TokenServer

LOCAL_PASSWORD = "local pw \"quoted\" \\ ü"


@dataclass
class ProxyHarness:
    state_dir: Path
    token_server: TokenServer
    dovecot: Dovecot

    def account(self, address: str, *, tls: str = "implicit", trust_ca: bool = True,
                port: int | None = None, pop3_tls: str = "implicit",
                pop3_port: int | None = None, **extra: Any) -> Account:
        """An account on the test Dovecot; ``tls``/``port`` pick the IMAP server,
        ``pop3_tls``/``pop3_port`` the POP3 one."""
        if port is None:
            port = self.dovecot.imaps_port if tls == "implicit" else self.dovecot.imap_port
        if pop3_port is None:
            pop3_port = self.dovecot.pop3s_port if pop3_tls == "implicit" \
                else self.dovecot.pop3_port
        return Account(
            address=address, provider="custom", client_id=TEST_CLIENT_ID,
            client_secret=TEST_CLIENT_SECRET, token_url=self.token_server.token_url,
            scopes=["mail"], imap_server=f"{self.dovecot.host}:{port}", imap_tls=tls,
            pop3_server=f"{self.dovecot.host}:{pop3_port}", pop3_tls=pop3_tls,
            ca_file=self.dovecot.ca_file if trust_ca else None, **extra)

    def settings(self, *accounts: Account, **tokens: Any) -> Settings:
        token_settings = {"retries": 1, **tokens}
        # Free ports for every listener: the defaults may be taken on a shared machine.
        return Settings(state_dir=self.state_dir,
                        imap=ImapListener(listen="127.0.0.1:0", tls_listen="127.0.0.1:0"),
                        pop3=Pop3Listener(listen="127.0.0.1:0", tls_listen="127.0.0.1:0"),
                        smtp=SmtpListener(listen="127.0.0.1:0", tls_listen="127.0.0.1:0"),
                        tokens=TokenSettings(**token_settings), accounts=list(accounts),
                        admin=AdminSettings(listen=""))

    def provision(self, address: str, password: str = LOCAL_PASSWORD, *,
                  master_key: bytes | None = None) -> str:
        """Set the local password and store a fresh refresh token; returns the token."""
        refresh_token = self.token_server.authority.issue_refresh_token(address, TEST_CLIENT_ID)
        Vault(self.state_dir, master_key=master_key).create(
            address.casefold(), password=password, state=TokenState(refresh_token=refresh_token))
        return refresh_token

    def store(self, address: str, password: str = LOCAL_PASSWORD) -> Vault:
        """The account's vault, opened with its local password (as the CLI would)."""
        vault = Vault(self.state_dir)
        if not vault.open_with_password(address.casefold(), password):
            raise AssertionError(f"the vault of {address} does not open with the password")
        return vault

    @contextlib.asynccontextmanager
    async def run(self, settings: Settings) -> AsyncIterator[Daemon]:
        daemon = Daemon(settings)
        task = asyncio.create_task(daemon.run())
        ready = asyncio.create_task(daemon.ready.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            task.result()  # raises what stopped it
        try:
            yield daemon
        finally:
            daemon.stop()
            await asyncio.wait_for(task, 30)
