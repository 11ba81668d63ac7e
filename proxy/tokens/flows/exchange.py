"""The token endpoint as a sign-in sees it: POST a form, turn the answer into a ``Grant`` or a
``FlowError`` that says what to fix; shared by every flow in this package."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from ...config import Account
from ..errors import FlowError
from ..grants import Refused, parse_expires_in, transient_status

DESCRIPTION_MAX = 400
# Form fields whose values must never appear in an error text, even echoed by a server.
_SECRET_FIELDS = ("client_secret", "client_assertion", "assertion", "code", "code_verifier",
                  "device_code", "refresh_token")


class Console(Protocol):
    """How a flow talks to the person running it (the CLI: stderr, stdin, webbrowser)."""

    def say(self, text: str) -> None: ...

    def ask(self, prompt: str) -> str:
        """One line typed by the person; EOFError when there is none."""
        ...

    def open_browser(self, url: str) -> bool:
        """False when no browser could be started."""
        ...


@dataclass(frozen=True)
class DeviceCode:
    """What the person needs for the device flow; given to a console's optional
    ``show_device_code(code)`` as soon as it is known (the admin page shows it itself)."""

    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_at: float  # epoch seconds, by the flow's clock


@dataclass(repr=False)
class Grant:
    """What a successful flow produced, for the token store."""

    access_token: str | None
    refresh_token: str | None
    expires_at: float | None  # epoch seconds
    scope: str | None

    def __repr__(self) -> str:
        def hidden(value: str | None) -> str:
            return "None" if value is None else "'[hidden]'"

        return (f"Grant(access_token={hidden(self.access_token)}, "
                f"refresh_token={hidden(self.refresh_token)}, expires_at={self.expires_at!r}, "
                f"scope={self.scope!r})")


class Unreachable(FlowError):
    """Network trouble, a timeout, 429 or 5xx: the device flow keeps polling through these."""


def _scrub(text: str, form: Mapping[str, str]) -> str:
    for name in _SECRET_FIELDS:
        value = form.get(name)
        if value and len(value) >= 6:
            text = text.replace(value, "[redacted]")
    return text


def clean(value: Any, form: Mapping[str, str]) -> str | None:
    """A server's text on one line, without the secrets of ``form``, shortened."""
    if value is None:
        return None
    text = " ".join(str(value).split())  # no line breaks or control characters from a server
    return _scrub(text, form)[:DESCRIPTION_MAX] or None


async def post(http: httpx.AsyncClient, url: str, form: dict[str, str]) -> dict[str, Any]:
    """POST ``form``; the JSON answer, or Refused / Unreachable / FlowError."""
    host = urlsplit(url).netloc
    try:
        response = await http.post(url, data=form, headers={"Accept": "application/json"})
    except httpx.TimeoutException:
        raise Unreachable(f"{host} did not answer in time; check the network and try "
                          "again") from None
    except httpx.HTTPError as exc:
        detail = _scrub(f"{type(exc).__name__}: {exc}", form)
        raise Unreachable(f"cannot reach {url} ({detail}); check the network, a proxy or the "
                          "configured URL") from None
    status = response.status_code
    if transient_status(status):
        raise Unreachable(f"{host} answered HTTP {status}; the provider has trouble, try "
                          "again later")
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise FlowError(f"{url} answered HTTP {status} with something other than a JSON "
                        "object; is the URL right?")
    if "error" in body or status >= 400:
        error = clean(body.get("error"), form) or f"HTTP {status}"
        raise Refused(error, clean(body.get("error_description"), form))
    return body


# Microsoft's error codes (AADSTS...) that point at a fix in the app registration.
_AADSTS_HINTS = {
    "AADSTS65001": "the user or an administrator has not consented to the app's permissions; "
                   "an administrator can grant consent under Enterprise applications",
    "AADSTS700025": "the app is registered as a public client: remove client_secret / "
                    "client_certificate from the account",
    "AADSTS7000218": "the app is a confidential client: configure client_secret or "
                     "client_certificate, or turn on 'Allow public client flows'",
    "AADSTS7000215": "the client secret is wrong (use the secret's value, not its id)",
    "AADSTS700027": "the certificate is not registered with the app, or its key does not match",
    "AADSTS50011": "the redirect URI is not registered with the app; add it under "
                   "Authentication (for a desktop app: http://localhost)",
}
_ERROR_HINTS = {
    "invalid_client": "check client_id and the client secret or certificate",
    "unauthorized_client": "the app registration does not allow this kind of request",
    "invalid_scope": "the provider refused the requested scopes",
    "invalid_grant": "the grant was refused (an expired or already used code, a failed PKCE "
                     "check, or a revoked or mismatched credential); start again",
    "access_denied": "access was declined",
    "consent_required": "consent to the app's permissions is missing",
    "interaction_required": "the provider requires an interactive sign-in (for example MFA)",
}


def refusal(account: Account, what: str, refused: Refused) -> FlowError:
    """The FlowError for a refused request, with a hint at the fix when the code has one."""
    hints = [hint for code, hint in _AADSTS_HINTS.items() if code in (refused.description or "")]
    if not hints and refused.code in _ERROR_HINTS:
        hints.append(_ERROR_HINTS[refused.code])
    hint = f": {hints[0]}" if hints else ""
    return FlowError(f"{account.address}: {what} was refused: {refused.text()}{hint}.")


async def token_request(http: httpx.AsyncClient, account: Account, url: str,
                        form: dict[str, str], what: str) -> dict[str, Any]:
    """POST ``form``; the answer, or a FlowError naming ``what`` failed."""
    try:
        return await post(http, url, form)
    except Refused as refused:
        raise refusal(account, what, refused) from None
    except FlowError as exc:
        raise FlowError(f"{account.address}: {what} failed: {exc}") from None


def grant_from(account: Account, answer: dict[str, Any], now: float, *, refresh: bool) -> Grant:
    """The grant in a token answer; ``refresh``: a refresh token is required."""
    access = answer.get("access_token")
    if not isinstance(access, str) or not access:
        raise FlowError(f"{account.address}: the token endpoint answered without an access "
                        "token; check token_url")
    refresh_token = answer.get("refresh_token") if refresh else None
    if not isinstance(refresh_token, str) or not refresh_token:
        refresh_token = None
    if refresh and refresh_token is None:
        raise FlowError(_no_refresh_token(account))
    scope = answer.get("scope")
    expires_at = now + parse_expires_in(answer) if "expires_in" in answer else None
    return Grant(access, refresh_token, expires_at, scope if isinstance(scope, str) else None)


def _no_refresh_token(account: Account) -> str:
    start = (f"{account.address}: the sign-in worked but no refresh token came back, so "
             "mailproxy could not renew access once the first token expires. ")
    if account.provider == "gmail":
        return start + ("Google issues one only with access_type=offline and prompt=consent "
                        "(the gmail preset asks for both; check an overridden authorize_url). "
                        "Remove the app's access at https://myaccount.google.com/permissions and "
                        f"run `mailproxy authorize {account.address}` again.")
    if account.provider in ("office365", "outlook"):
        return start + "Microsoft issues one only when the scopes include offline_access."
    return start + ("Ask the provider for offline access (often the offline_access scope) and "
                    "run authorize again.")
