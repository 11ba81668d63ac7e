"""The device code flow (RFC 8628): show a code to enter on another device, then poll the token
endpoint until the person has signed in, declined, or the code expired."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from ...config import Account
from ..errors import FlowError
from ..grants import Refused, client_auth_params
from .exchange import (
    Console,
    DeviceCode,
    Grant,
    Unreachable,
    grant_from,
    post,
    refusal,
    token_request,
)

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628: poll every 5 s unless told otherwise, 5 s slower after each slow_down.
DEFAULT_INTERVAL = 5.0
SLOW_DOWN_STEP = 5.0
# RFC 8628 makes expires_in mandatory; if a server leaves it out, stop after this long.
DEFAULT_DEVICE_LIFETIME = 900.0
# The person watching the device flow is told how long the code still lives this often.
COUNTDOWN_EVERY = 60.0

def _number(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return default
    try:
        number = float(value)
    except ValueError:
        return default
    return number if number > 0 and number != float("inf") else default


async def device_code_flow(
    account: Account,
    console: Console,
    http: httpx.AsyncClient,
    token_url: str,
    *,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
) -> Grant:
    """Show a code for the person to enter elsewhere; poll until the sign-in ends."""
    if not account.device_authorization_url:
        if account.provider == "gmail":
            raise FlowError(
                f"{account.address}: Google does not allow the device flow for mail (the mail "
                'scope is refused); use flow = "authorization_code" with '
                f"`mailproxy authorize --manual {account.address}` on a headless machine.")
        raise FlowError(f"{account.address}: flow 'device_code' needs "
                        "device_authorization_url")
    url = account.device_authorization_url
    start = clock()
    form = {"client_id": account.client_id}
    if account.scopes:
        form["scope"] = " ".join(account.scopes)
    form.update(client_auth_params(account, url, now=start))
    answer = await token_request(http, account, url, form, "the device authorization request")
    device_code = answer.get("device_code")
    user_code = answer.get("user_code")
    # Google's older endpoint spells it verification_url.
    verify = answer.get("verification_uri") or answer.get("verification_url")
    if not all(isinstance(v, str) and v for v in (device_code, user_code, verify)):
        raise FlowError(f"{account.address}: {url} answered without device_code, user_code "
                        "and verification_uri; is it a device authorization endpoint?")
    assert isinstance(device_code, str) and isinstance(user_code, str)
    interval = _number(answer.get("interval"), DEFAULT_INTERVAL)
    expires_at = start + _number(answer.get("expires_in"), DEFAULT_DEVICE_LIFETIME)
    complete = answer.get("verification_uri_complete")
    shown = getattr(console, "show_device_code", None)
    if shown is not None:  # a console that shows the code itself (the admin page)
        shown(DeviceCode(user_code, str(verify), complete if isinstance(complete, str) else None,
                         expires_at))
    also = f"\n(or open {complete}, which carries the code)" if isinstance(complete, str) else ""
    console.say(f"To authorize {account.address}, open {verify} in a browser on any device and "
                f"enter the code\n\n  {user_code}\n{also}\nThe code expires in "
                f"{_clock_text(expires_at - clock())}.")

    poll = {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code,
            "client_id": account.client_id}
    told_at = clock()
    unreachable_said = False
    while True:
        await sleep(interval)
        now = clock()
        if now >= expires_at:
            raise FlowError(f"{account.address}: the code {user_code} expired before the "
                            f"sign-in finished; run `mailproxy authorize {account.address}` "
                            "again.")
        if now - told_at >= COUNTDOWN_EVERY:
            told_at = now
            console.say(f"Still waiting for the sign-in; the code {user_code} expires in "
                        f"{_clock_text(expires_at - now)}.")
        request = dict(poll, **client_auth_params(account, token_url, now=now))
        try:
            token = await post(http, token_url, request)
        except Unreachable as exc:
            if not unreachable_said:  # a blip must not end a 15-minute wait
                console.say(f"The token endpoint is not answering ({exc}); still trying.")
                unreachable_said = True
            continue
        except Refused as refused:
            if refused.code == "authorization_pending":
                continue
            if refused.code == "slow_down":
                interval += SLOW_DOWN_STEP
                continue
            if refused.code in ("access_denied", "authorization_declined"):
                raise FlowError(f"{account.address}: the sign-in with code {user_code} was "
                                "declined. Run `mailproxy authorize "
                                f"{account.address}` again and accept the requested "
                                "access.") from None
            if refused.code in ("expired_token", "code_expired"):
                raise FlowError(f"{account.address}: the code {user_code} expired before the "
                                f"sign-in finished; run `mailproxy authorize "
                                f"{account.address}` again.") from None
            raise refusal(account, "the device code token request", refused) from None
        except FlowError as exc:
            raise FlowError(f"{account.address}: the device code token request failed: "
                            f"{exc}") from None
        return grant_from(account, token, now, refresh=True)


def _clock_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"

