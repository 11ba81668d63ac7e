"""``mailproxy token import``: store a refresh token obtained elsewhere, then try it once."""

from __future__ import annotations

import sys
import time

from ..config import Account, Settings
from ..tokens.errors import AuthorizationRequired, TokenError
from ..tokens.manager import TokenManager
from .common import EXIT_OK, EXIT_USAGE, CliError, need, open_vault, read, store_grant


async def token_import(settings: Settings, account: Account, *, verify: bool) -> int:
    if account.flow in ("client_credentials", "service_account"):
        raise CliError(f"{account.address} uses flow {account.flow!r}: it needs no refresh "
                       "token", EXIT_USAGE)
    vault = open_vault(settings)
    refresh_token = need(read(f"Refresh token for {account.address}: "))
    exists = vault.exists(account.key)
    prompt = (f"Local password of {account.address}: " if exists else
              f"New local password for {account.address}: ")
    optional = vault.has_master_key
    password = read(prompt, confirm=not exists, optional=optional)
    # A typed password must open the vault, master key or not: a mistyped one would otherwise
    # be added as a new slot. With a master key, an empty answer uses the master key.
    if exists and password is not None and not vault.open_with_password(account.key, password):
        hint = " (leave it empty to use the master key)" if optional else ""
        raise CliError(f"that password does not open the vault of {account.address}; nothing "
                       f"changed{hint}")
    now = time.time()
    store_grant(vault, account, password, {
        "refresh_token": refresh_token, "access_token": None, "expires_at": None,
        "needs_authorization": None, "last_error": None, "authorized_at": now})
    print(f"refresh token for {account.address} stored")
    if not verify:
        return EXIT_OK
    try:
        async with TokenManager([account], vault, settings.tokens) as manager:
            token = await manager.get_token(account.key, force_refresh=True)
            remaining = max(0, int(token.expires_at - manager.clock()))
    except AuthorizationRequired as exc:
        raise CliError(f"the token endpoint refused this refresh token: {exc.reason}") from None
    except TokenError as exc:
        print(f"warning: could not try the token now ({exc.reason}); it is stored and will be "
              "used when the token endpoint is reachable", file=sys.stderr)
        return EXIT_OK
    print(f"token works: access token valid for {remaining} s")
    return EXIT_OK
