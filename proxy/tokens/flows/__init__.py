"""The first grant for an account: OAuth2 authorization flows run by ``mailproxy authorize``.

:func:`authorize` runs the account's flow (authorization code with PKCE and a loopback redirect,
or with the redirect address pasted by hand; device code; client credentials; service account)
and returns a :class:`Grant` for the caller to store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx

from ...config import Account
from ..errors import FlowError
from ..grants import (
    CLIENT_ASSERTION_TYPE,
    JWT_BEARER_GRANT,
    app_token_form,
    client_auth_params,
    token_url,
)
from .authcode import (
    Redirect,
    authorization_code_flow,
    authorization_url,
    parse_pasted,
    redeem_code,
)
from .device import DEVICE_CODE_GRANT, device_code_flow
from .exchange import Console, DeviceCode, Grant, grant_from, token_request

__all__ = [
    "CLIENT_ASSERTION_TYPE",
    "DEVICE_CODE_GRANT",
    "JWT_BEARER_GRANT",
    "Console",
    "DeviceCode",
    "FlowError",
    "Grant",
    "Redirect",
    "app_token_form",
    "authorization_url",
    "authorize",
    "client_auth_params",
    "exchange_code",
    "parse_pasted",
]


async def authorize(
    account: Account,
    console: Console,
    *,
    manual: bool = False,
    timeout: float = 300.0,
    request_timeout: float = 20.0,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Grant:
    """Run the account's flow and return its grant, or raise :class:`FlowError`.

    ``manual``: for authorization_code on a machine without a browser, the person pastes the
    address the provider redirected to. ``timeout``: how long to wait for the browser's
    redirect (the device flow waits as long as its code lives).
    """
    url = token_url(account)
    async with httpx.AsyncClient(timeout=request_timeout, transport=transport) as http:
        if account.flow == "authorization_code":
            return await authorization_code_flow(account, console, http, url, manual=manual,
                                                 timeout=timeout, clock=clock)
        if account.flow == "device_code":
            return await device_code_flow(account, console, http, url, clock=clock,
                                          sleep=sleep)
        now = clock()
        form = app_token_form(account, now=now)
        answer = await token_request(http, account, url, form, f"the {account.flow} request")
        return grant_from(account, answer, now, refresh=False)


async def exchange_code(
    account: Account,
    code: str,
    redirect_uri: str,
    code_verifier: str,
    *,
    request_timeout: float = 20.0,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.time,
) -> Grant:
    """Redeem an authorization code whose redirect someone else received (the admin page's
    ``/oauth/callback``); the same request ``authorize`` makes after its loopback redirect."""
    url = token_url(account)
    async with httpx.AsyncClient(timeout=request_timeout, transport=transport) as http:
        return await redeem_code(account, http, url, code, redirect_uri, code_verifier,
                                 clock())
