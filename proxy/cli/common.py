"""What the commands share: exit codes and ``CliError``, finding the account, reading a value
from a prompt or standard input, opening the vault, and opening a browser."""

from __future__ import annotations

import getpass
import sys
import threading
import webbrowser
from typing import Any

from ..config import Account, Settings
from ..tokens.keys import MasterKeyError, load_master_key
from ..vault import PasswordNeeded, Vault, policy

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A failure to report in one line, with the exit code to use."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def find_account(settings: Settings, name: str) -> Account:
    account = settings.account(name)
    if account is None:
        known = ", ".join(a.address for a in settings.accounts) or "none configured"
        raise CliError(f"no account {name!r} in the configuration (accounts: {known})",
                       EXIT_USAGE)
    return account


def read(prompt: str, *, secret: bool = True, confirm: bool = False,
         optional: bool = False) -> str | None:
    """One value: the next line of standard input when it is not a terminal (scripts), else
    a prompt (hidden for secrets, asked twice with ``confirm``)."""
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        value = line.rstrip("\r\n")
        if not value:
            if optional:
                return None
            raise CliError(f"expected a line on standard input for: {prompt.rstrip(': ')}",
                           EXIT_USAGE)
        return value
    ask = getpass.getpass if secret else input
    value = ask(prompt)
    if not value and optional:
        return None
    if confirm and ask("Again: ") != value:
        raise CliError("the two entries differ; nothing changed", EXIT_USAGE)
    if not value:
        raise CliError("empty input; nothing changed", EXIT_USAGE)
    return value


def need(value: str | None) -> str:
    assert value is not None
    return value


def open_vault(settings: Settings) -> Vault:
    """The vault with the configured master key, if any."""
    master = None
    if settings.vault.master_key:
        try:
            master = load_master_key(settings.vault.master_key)
        except MasterKeyError as exc:
            raise CliError(str(exc)) from None
    return Vault(settings.state_dir, master_key=master)


def open_existing(vault: Vault, account: Account, purpose: str) -> None:
    """Open an existing vault: the master key, else a current local password."""
    if vault.has_master_key and vault.open_with_master(account.key):
        return
    current = need(read(f"A current local password of {account.address} ({purpose}): "))
    if not vault.open_with_password(account.key, current):
        raise CliError(f"that password does not open the vault of {account.address}; nothing "
                       "changed")


def store_grant(vault: Vault, account: Account, password: str | None,
                fields: dict[str, Any]) -> None:
    """``proxy.vault.policy.store_grant``, with its outcome told to the person."""
    try:
        lost = policy.store_grant(vault, account.key, password, fields)
    except PasswordNeeded:
        raise CliError(f"a local password for {account.address} is needed to encrypt its "
                       "tokens", EXIT_USAGE) from None
    if lost:
        print(f"note: the earlier local passwords of {account.address} ({len(lost)}) no "
              "longer work: none of them was given, so the vault was made anew",
              file=sys.stderr)


def open_browser(url: str) -> bool:
    """Open ``url`` in a browser; False when none could be started."""
    # In a thread: webbrowser waits for some browsers to exit ($BROWSER, text browsers),
    # which would stall the loopback listener that has to answer that very browser.
    result: list[bool] = []

    def launch() -> None:
        try:
            result.append(webbrowser.open(url))
        except webbrowser.Error:
            result.append(False)

    thread = threading.Thread(target=launch, name="browser", daemon=True)
    thread.start()
    thread.join(2.0)
    return result[0] if result else True  # still running: a browser is up
