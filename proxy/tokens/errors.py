"""Errors of the token side, typed by what the caller can do about them.

``reason`` is a sentence for logs and for the reply to a mail client. It never holds a token,
a refresh token or a client secret: the manager scrubs them before building one.
"""

from __future__ import annotations


class TokenError(Exception):
    """No access token for ``account``; ``reason`` says why."""

    def __init__(self, account: str, reason: str) -> None:
        super().__init__(f"{account}: {reason}")
        self.account = account
        self.reason = reason


class AuthorizationRequired(TokenError):
    """Permanent until a person acts: sign in again (``mailproxy token import``) or fix the app
    registration. Retrying does not help, so the proxy answers the client with a hard failure."""


class TokenUnavailable(TokenError):
    """Temporary: network, timeout, 5xx, 429 or garbage from the token endpoint, after retries.

    ``retry_after`` is the provider's Retry-After in seconds when it sent one.
    """

    def __init__(self, account: str, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(account, reason)
        self.retry_after = retry_after


class FlowError(Exception):
    """Authorization did not complete, or a token request could not be built (an unreadable key
    or certificate); the text says what to do and holds no secret."""
