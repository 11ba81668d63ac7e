"""The daemon's token requests for one account (refresh, client credentials, service account)
through authlib, with the retries inside one request and every failure classified."""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from ..config import Account, TokenSettings
from ..net import client_tls_context, describe_error
from .errors import FlowError, TokenUnavailable
from .grants import (
    TRANSIENT_ERRORS,
    Refused,
    app_token_form,
    client_auth_params,
    parse_retry_after,
    transient_status,
)

with warnings.catch_warnings():
    # authlib 1.9 prefers the new "httpx2" package and warns on every start when it falls back to
    # httpx, which is what we pin. Its deprecate module installs an "always" filter on import, so
    # import it first and put ours in front.
    import authlib.deprecate  # type: ignore[import-untyped]  # noqa: F401

    warnings.filterwarnings("ignore", message="The httpx module is deprecated")
    from authlib.integrations.httpx_client import (  # type: ignore[import-untyped]
        AsyncOAuth2Client,
        OAuthError,
    )

if not issubclass(AsyncOAuth2Client, httpx.AsyncClient):
    # With httpx2 installed authlib silently switches to it; then our transports and the httpx
    # exceptions caught below would no longer match what it raises.
    raise ImportError("authlib is using the 'httpx2' package; mailproxy is built on 'httpx'")

log = logging.getLogger("mailproxy.tokens")

# Retries inside one token request: 1 s, 2 s, 4 s ... (times 0.5-1 jitter), at most 30 s.
RETRY_BASE = 1.0
RETRY_CAP = 30.0
# A longer Retry-After ends the retries at once: a login should not hang on it.
RETRY_AFTER_MAX = 30.0
_REASON_MAX = 400


class _Transient(Exception):
    """One failed attempt worth retrying."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class TokenEndpoint:
    """One account's token endpoint. ``request`` returns the token reply, or raises
    ``Refused`` (an OAuth error a retry will not cure) or ``TokenUnavailable`` (after retries)."""

    def __init__(
        self,
        account: Account,
        settings: TokenSettings,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        rng: random.Random,
        transport: httpx.AsyncBaseTransport | None,
    ) -> None:
        self.account = account
        self._settings = settings
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._transport = transport
        self._client: Any = None  # AsyncOAuth2Client, made on first use

    async def request(self, used: str | None, scrub: Callable[[str], str]) -> dict[str, Any]:
        """Refresh with ``used``, or (None) ask with the app's credential. ``scrub`` removes
        secrets from the reason of a ``TokenUnavailable``."""
        attempts = self._settings.retries + 1
        for attempt in range(attempts):
            try:
                return await self._request(used)
            except _Transient as exc:
                failure = exc
            retry_after = failure.retry_after
            if attempt + 1 == attempts or (retry_after or 0.0) > RETRY_AFTER_MAX:
                break
            delay = min(RETRY_CAP, RETRY_BASE * 2**attempt) * self._rng.uniform(0.5, 1.0)
            delay = max(delay, retry_after or 0.0)
            log.info("%s: token request failed (%s), retrying in %.1f s", self.account.key,
                     failure.reason, delay)
            await self._sleep(delay)
        reason = scrub(f"{failure.reason} (after {attempt + 1} attempts)")
        raise TokenUnavailable(self.account.key, reason, retry_after=failure.retry_after)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _request(self, used: str | None) -> dict[str, Any]:
        try:
            client = self._get_client()
        except OSError as exc:  # its CA files unreadable for now (out of file descriptors)
            raise _Transient(f"cannot prepare the request: {describe_error(exc)}") from None
        account = self.account
        url = account.token_url or ""
        try:
            # A certificate credential signs a fresh client assertion per request; a secret
            # goes in by authlib's client_secret_post.
            if used is not None:
                extra = client_auth_params(account, url, now=self._clock()) \
                    if account.client_certificate else {}
                token = await client.refresh_token(url, refresh_token=used, **extra)
            elif account.client_certificate or account.flow == "service_account":
                form = app_token_form(account, now=self._clock())
                form.pop("client_id", None)  # authlib adds it
                token = await client.fetch_token(url, **form)
            else:
                token = await client.fetch_token(url, grant_type="client_credentials")
        except FlowError as exc:  # an unreadable key or certificate file
            raise Refused("invalid_client", str(exc)) from None
        except OAuthError as exc:
            code = str(exc.error or "oauth_error")
            description = " ".join(str(exc.description or "").split())[:_REASON_MAX] or None
            if code in TRANSIENT_ERRORS:
                raise _Transient(f"token endpoint error {code}: {description}") from None
            raise Refused(code, description) from None
        except httpx.HTTPStatusError as exc:  # authlib: an error status without a JSON body
            raise _Transient(f"token endpoint answered HTTP {exc.response.status_code} "
                             "without an OAuth error") from None
        except httpx.TimeoutException:
            raise _Transient("token endpoint timed out") from None
        except httpx.HTTPError as exc:
            raise _Transient(f"cannot reach the token endpoint: {type(exc).__name__}: {exc}"
                             ) from None
        except ValueError:
            # authlib: a 2xx body that is not a JSON object, or an expires_in int() refuses.
            raise _Transient("token endpoint response could not be parsed") from None
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            raise _Transient("token endpoint response has no access_token")
        return dict(token)

    def _get_client(self) -> Any:
        if self._client is None:
            account = self.account
            secret = account.client_secret.get_secret_value() if account.client_secret else None
            self._client = AsyncOAuth2Client(
                # A service account identifies itself by the signed assertion alone.
                client_id=account.client_id or None,
                client_secret=secret,
                # Both providers take client_secret_post; public clients send only client_id.
                token_endpoint_auth_method="client_secret_post" if secret else "none",
                scope=" ".join(account.scopes or ()) or None,
                timeout=self._settings.request_timeout,
                transport=self._transport,
                # The system's trust store plus the account's ca_file, as for the mail servers.
                verify=client_tls_context(account.ca_file),
            )
            for hook in ("access_token_response", "refresh_token_response"):
                self._client.register_compliance_hook(hook, self._check_status)
        return self._client

    def _check_status(self, response: httpx.Response) -> httpx.Response:
        # Before authlib parses the body: it would turn a 429 or 503 carrying a JSON error into
        # an OAuthError and drop the Retry-After header.
        status = response.status_code
        if transient_status(status):
            retry_after = parse_retry_after(response.headers.get("retry-after"), self._clock())
            raise _Transient(f"token endpoint answered HTTP {status}", retry_after)
        return response
