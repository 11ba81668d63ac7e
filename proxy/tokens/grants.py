"""Pieces of token requests shared by the authorization flows and the token manager: how the
client authenticates, the app-only grant forms, reading the reply, classifying its errors."""

from __future__ import annotations

import math
from email.utils import parsedate_to_datetime
from typing import Any

from ..config import Account
from .assertion import (
    CredentialError,
    client_assertion,
    load_certificate_credential,
    load_service_account,
    service_account_assertion,
)
from .errors import FlowError

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_EXPIRES_IN = 3600.0

# Flows whose grant is a refresh token from a sign-in; the others ask with the app's credential.
REFRESH_FLOWS = frozenset({"authorization_code", "device_code"})
# OAuth error codes that a retry may cure.
TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})
# Errors tied to the user's grant, kept in the store until a new sign-in. invalid_client and
# unauthorized_client are not: they are fixed in the configuration, and a mark would survive
# that fix and the restart after it.
MARKING_ERRORS = frozenset({"invalid_grant", "interaction_required", "consent_required"})


def transient_status(status: int) -> bool:
    """Whether an HTTP status from a token endpoint means "try again later" (408, 429, 5xx)."""
    return status in (408, 429) or status >= 500


class Refused(Exception):
    """The token endpoint answered with an OAuth error (RFC 6749 section 5.2)."""

    def __init__(self, code: str, description: str | None) -> None:
        super().__init__(code)
        self.code = code
        self.description = description

    def text(self) -> str:
        return f"{self.code} ({self.description})" if self.description else self.code


def parse_expires_in(token: dict[str, Any]) -> float:
    """Seconds the access token lives: ``expires_in`` (a number or numeric string), else 3600."""
    raw = token.get("expires_in")
    if raw is None or isinstance(raw, bool):
        return DEFAULT_EXPIRES_IN
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return DEFAULT_EXPIRES_IN
    return value if math.isfinite(value) and value >= 0 else DEFAULT_EXPIRES_IN


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from ``now``: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def client_auth_params(account: Account, token_url: str, *, now: float) -> dict[str, str]:
    """Form fields that authenticate the client at ``token_url`` (``client_id`` not included).

    A certificate gives a fresh signed client assertion per call (servers refuse a replayed
    one), a secret gives ``client_secret``, a public client gives nothing.
    """
    if account.client_certificate is not None:
        try:
            credential = load_certificate_credential(account.client_certificate,
                                                     account.client_certificate_key)
        except CredentialError as exc:
            raise FlowError(f"{account.address}: {exc}") from None
        return {
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": client_assertion(account.client_id, token_url, credential,
                                                 now=now),
        }
    if account.client_secret is not None:
        return {"client_secret": account.client_secret.get_secret_value()}
    return {}


def token_url(account: Account) -> str:
    """The account's token endpoint, or FlowError when none is configured."""
    if not account.token_url:  # the config fills it in for presets and requires it for custom
        raise FlowError(f"{account.address}: no token_url configured")
    return account.token_url


def app_token_form(account: Account, *, now: float) -> dict[str, str]:
    """The whole token request form for the flows that need no refresh token."""
    url = token_url(account)
    scope = " ".join(account.scopes or ())
    if account.flow == "client_credentials":
        form = {"grant_type": "client_credentials", "client_id": account.client_id}
        if scope:
            form["scope"] = scope
        form.update(client_auth_params(account, url, now=now))
        return form
    if account.flow == "service_account":
        assert account.service_account_file is not None  # the config requires it for this flow
        try:
            key = load_service_account(account.service_account_file)
        except CredentialError as exc:
            raise FlowError(f"{account.address}: {exc}") from None
        assertion = service_account_assertion(key, account.address, account.scopes or (),
                                              url, now=now)
        return {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}
    raise FlowError(f"{account.address}: flow {account.flow!r} gets its tokens from a sign-in, "
                    f"not from a token request alone; run `mailproxy authorize {account.address}`")
