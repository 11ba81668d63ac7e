"""``mailproxy token import``: try a refresh token obtained elsewhere once, then store it."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import Any

from ..config import Account, Settings
from ..tokens.endpoint import TokenEndpoint
from ..tokens.errors import TokenUnavailable
from ..tokens.grants import Refused
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
    fields: dict[str, Any] = {
        "refresh_token": refresh_token, "access_token": None, "expires_at": None,
        "needs_authorization": None, "last_error": None, "authorized_at": now}
    remaining: int | None = None
    if verify:
        # Tried before anything is stored: a refused token must not replace a working one.
        rng = random.Random()  # noqa: S311  # retry jitter, not cryptography
        endpoint = TokenEndpoint(account, settings.tokens, clock=time.time, sleep=asyncio.sleep,
                                 rng=rng, transport=None)
        try:
            token = await endpoint.request(refresh_token, lambda text: text.replace(
                refresh_token, "[redacted]"))
        except Refused as exc:
            raise CliError(f"the token endpoint refused this refresh token ({exc.text()}); "
                           "nothing was stored") from None
        except TokenUnavailable as exc:
            print(f"warning: could not try the token now ({exc.reason}); storing it anyway: "
                  "it is used once the token endpoint is reachable", file=sys.stderr)
        else:
            # The provider may have rotated the refresh token: keep the one it just gave.
            fields["refresh_token"] = token.get("refresh_token") or refresh_token
            fields["access_token"] = token["access_token"]
            expires_in = float(token.get("expires_in") or 3600)
            fields["expires_at"] = time.time() + expires_in
            fields["last_refresh"] = time.time()
            remaining = int(expires_in)
        finally:
            await endpoint.aclose()
    store_grant(vault, account, password, fields)
    if remaining is not None:
        print(f"token works: access token valid for {remaining} s; refresh token for "
              f"{account.address} stored")
    else:
        print(f"refresh token for {account.address} stored")
    return EXIT_OK
