"""``mailproxy authorize``: sign an account in with its flow, then store the grant in its vault
under the local password clients will log in with."""

from __future__ import annotations

import argparse
import contextlib
import secrets
import sys
import time
from collections.abc import Iterator

from ..config import Account, Settings
from ..tokens import flows
from ..vault import signin
from ..vault.policy import grant_fields
from .common import (
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    need,
    open_browser,
    open_vault,
    read,
    store_grant,
)


class _Console:
    """What the flows need from a person: messages on stderr, lines from stdin, a browser."""

    def __init__(self, browser: bool) -> None:
        self.browser = browser

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def ask(self, prompt: str) -> str:
        if sys.stdin.isatty():
            return input(prompt)
        print(prompt, file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    def open_browser(self, url: str) -> bool:
        return self.browser and open_browser(url)


@contextlib.contextmanager
def _one_authorization(settings: Settings, account: Account) -> Iterator[None]:
    """Only one sign-in per account at a time (``proxy.vault.signin``): another ``authorize``
    or the admin page of the running daemon may be signing it in."""
    try:
        lock = signin.take(settings.state_dir, account.key, "authorize")
    except signin.SignInBusy as exc:
        pid = exc.holder.pid or "?"
        if exc.holder.who == "admin":
            raise CliError(f"the admin page (mailproxy daemon, pid {pid}) is signing "
                           f"{account.address} in right now; finish or cancel it there first "
                           "(a browser sign-in left open ends after 15 minutes)") from None
        raise CliError(f"another `mailproxy authorize {account.address}` is already "
                       f"running (pid {pid}); finish or stop it first") from None
    try:
        yield
    finally:
        lock.release()


async def authorize(settings: Settings, account: Account, args: argparse.Namespace) -> int:
    vault = open_vault(settings)
    with _one_authorization(settings, account):
        try:
            grant = await flows.authorize(account, _Console(browser=not args.no_browser),
                                          manual=args.manual, timeout=args.timeout,
                                          request_timeout=settings.tokens.request_timeout)
        except flows.FlowError as exc:
            raise CliError(str(exc)) from None
        except EOFError:
            raise CliError("no input: nothing was authorized", EXIT_USAGE) from None
        if args.generate_password:
            password = secrets.token_urlsafe(18)
        else:
            password = need(read(f"Local password for {account.address} (clients log in "
                                 "with it): ", confirm=True))
        now = time.time()
        fields = grant_fields(account.flow, grant.access_token, grant.expires_at,
                              grant.refresh_token, now)
        if vault.exists(account.key) and not vault.has_master_key and not args.replace \
                and not vault.open_with_password(account.key, password):
            # A new vault would lock out every device with another password of this one.
            raise CliError(f"that password opens no slot of the existing vault of "
                           f"{account.address}; nothing changed. Type one of its local "
                           "passwords, or run again with --replace to make a new vault (every "
                           "other local password of it stops working)", EXIT_USAGE)
        store_grant(vault, account, password, fields)
    print(f"{account.address} is authorized", end="")
    if grant.expires_at:
        print(f"; access token valid for {max(0, int(grant.expires_at - now))} s", end="")
    print()
    if args.generate_password:
        print(f"local password for {account.address} (shown once): {password}")
    return EXIT_OK
