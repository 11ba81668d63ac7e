"""A real OAuth2 token endpoint (RFC 6749) and introspection endpoint (RFC 7662) for tests.

Beyond refresh and client credentials the token listener speaks the flows ``mailproxy
authorize`` runs: ``GET /authorize`` (authorization code with PKCE, RFC 7636; consent is given
automatically), ``POST /devicecode`` plus the device grant (RFC 8628), the JWT bearer grant of
Google service accounts and client assertions (RFC 7523). JWTs are checked with
``cryptography``; everything else is stdlib.

Each listener is a ``ThreadingHTTPServer`` served from a daemon thread, so it works whatever
event loop (or none) a test runs in. Two listeners share one :class:`TokenAuthority`:

* the *token* listener (``POST /token``), which the proxy talks to, and
* the *introspection* listener (``POST /introspect``), which Dovecot talks to.

Tests can take the token listener down (connection refused) and bring it back on the same
port while Dovecot keeps validating tokens through the introspection listener.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import ipaddress
import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, unquote_plus, urlencode, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

DEFAULT_ACCESS_TOKEN_LIFETIME = 3600
DEFAULT_SCOPE = "mail"
# The ``token_server`` fixture registers this client (no app-only user).
TEST_CLIENT_ID = "mailproxy-test-client"
TEST_CLIENT_SECRET = "mailproxy-test-secret"

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_AUTHORIZATION_CODE_LIFETIME = 60.0
DEFAULT_DEVICE_CODE_LIFETIME = 900.0
DEFAULT_DEVICE_INTERVAL = 5.0
DEFAULT_DEVICE_SLOW_DOWN_STEP = 5.0
# Clock skew tolerated on JWT nbf/iat.
JWT_LEEWAY = 30


class OAuthError(Exception):
    """An RFC 6749 error answer."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status = status
        self.error = error
        self.description = description


@dataclass
class _Client:
    client_id: str
    client_secret: str | None  # None and no certificate: a public client
    app_only_user: str | None
    certificate: x509.Certificate | None = None


@dataclass
class _AuthorizationCode:
    client_id: str
    redirect_uri: str
    code_challenge: str
    user: str
    scope: str
    offline: bool  # offline_access scope or access_type=offline was asked for
    expires_at: float


@dataclass
class _DeviceCode:
    device_code: str
    user_code: str
    client_id: str
    scope: str
    expires_at: float
    interval: float
    last_poll: float | None = None
    user: str | None = None  # set when approved
    denied: bool = False


@dataclass
class _RefreshToken:
    user: str
    client_id: str
    revoked: bool = False
    # With retire_rotated_on_first_use: the token it was rotated from, retired when this one
    # is first used.
    predecessor: _RefreshToken | None = None


@dataclass
class _AccessToken:
    user: str
    expires_at: float
    revoked: bool = False


@dataclass
class _Failure:
    status: int
    body: bytes
    content_type: str


@dataclass
class TokenAuthority:
    """Thread-safe state shared by the token and introspection listeners.

    Settings (plain attributes; tests may assign them directly, :meth:`reset_settings`
    puts them back):

    * ``access_token_lifetime``: seconds, default 3600 (``expires_in`` and introspection ``exp``)
    * ``rotate_refresh_tokens``: a refresh grant returns a new refresh token, the old one dies
    * ``retire_rotated_on_first_use``: with rotation, the old one dies only when the new one is
      first used (a client that crashed before saving the new one loses nothing)
    * ``access_token_length``: pad access tokens to this many characters (0 = natural length)
    * ``token_delay``: seconds to sleep before answering ``/token``
    * ``consent_user``: who signs in at ``/authorize`` (default: the ``login_hint``)
    * ``deny_authorization``: ``/authorize`` redirects with ``error=access_denied``
    * ``authorization_refresh_tokens``: when the authorization code and device grants issue a
      refresh token: ``"always"``, ``"offline"`` (only for the ``offline_access`` scope or
      ``access_type=offline``, like Microsoft and Google) or ``"never"``
    * ``authorization_code_lifetime``, ``device_code_lifetime``: seconds
    * ``device_interval``: the polling interval the device grant asks for and enforces;
      ``device_slow_down_step`` is added to it after each ``slow_down``
    * ``https_redirects``: https:// redirect URIs registered for the client (as a "Web"
      platform redirect at Microsoft or a "Web application" client at Google); loopback
      http:// ones are always accepted (a desktop client), any other is refused
    """

    access_token_lifetime: float = DEFAULT_ACCESS_TOKEN_LIFETIME
    rotate_refresh_tokens: bool = False
    retire_rotated_on_first_use: bool = False
    access_token_length: int = 0
    token_delay: float = 0.0
    scope: str = DEFAULT_SCOPE
    # (grant_type, user or None, time.time()) for every /token request, in arrival order
    token_requests: list[tuple[str, str | None, float]] = field(default_factory=list)
    # (token, active) for every /introspect request
    introspection_requests: list[tuple[str, bool]] = field(default_factory=list)
    consent_user: str | None = None
    deny_authorization: bool = False
    authorization_refresh_tokens: Literal["always", "offline", "never"] = "always"
    authorization_code_lifetime: float = DEFAULT_AUTHORIZATION_CODE_LIFETIME
    device_code_lifetime: float = DEFAULT_DEVICE_CODE_LIFETIME
    device_interval: float = DEFAULT_DEVICE_INTERVAL
    device_slow_down_step: float = DEFAULT_DEVICE_SLOW_DOWN_STEP
    https_redirects: set[str] = field(default_factory=set)
    # the query of every GET /authorize, in arrival order
    authorize_requests: list[dict[str, str]] = field(default_factory=list)
    # (user_code, outcome) for every device grant poll: "ok" or the error code answered
    device_polls: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._clients: dict[str, _Client] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._access: dict[str, _AccessToken] = {}
        self._failures: deque[_Failure] = deque()
        self._codes: dict[str, _AuthorizationCode] = {}
        self._devices: dict[str, _DeviceCode] = {}  # by device_code
        self._service_accounts: dict[str, rsa.RSAPublicKey] = {}
        self._seen_jti: set[str] = set()

    # ----------------------------------------------------------------- controls

    def register_client(
        self,
        client_id: str,
        client_secret: str | None = None,
        app_only_user: str | None = None,
        *,
        certificate_pem: bytes | str | None = None,
    ) -> None:
        """Register (or replace) an OAuth client.

        ``app_only_user`` is the mailbox that ``client_credentials`` tokens of this client
        are valid for (the proxy takes the mailbox address from its config).
        ``certificate_pem``: the client may authenticate with a client assertion signed by
        this certificate's key. Neither a secret nor a certificate: a public client, which
        sends only its ``client_id`` (and is refused if it sends a secret).
        """
        certificate = None
        if certificate_pem is not None:
            data = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
            certificate = x509.load_pem_x509_certificate(data)
        with self._lock:
            self._clients[client_id] = _Client(client_id, client_secret, app_only_user,
                                               certificate)

    def register_service_account(self, client_email: str, public_key_pem: bytes | str) -> None:
        """Accept JWT bearer assertions from ``client_email`` signed by this RSA key."""
        data = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("service accounts sign with RSA keys")
        with self._lock:
            self._service_accounts[client_email] = key

    def approve_device(self, user_code: str, user: str) -> None:
        """The person enters ``user_code`` and signs in as ``user``."""
        with self._lock:
            self._device_by_user_code(user_code).user = user

    def deny_device(self, user_code: str) -> None:
        """The person enters ``user_code`` and declines."""
        with self._lock:
            self._device_by_user_code(user_code).denied = True

    def pending_user_codes(self) -> list[str]:
        with self._lock:
            return [d.user_code for d in self._devices.values()
                    if d.user is None and not d.denied]

    def _device_by_user_code(self, user_code: str) -> _DeviceCode:
        for device in self._devices.values():
            if device.user_code == user_code:
                return device
        raise KeyError(f"no device code with user code {user_code!r}")

    def issue_refresh_token(self, user: str, client_id: str) -> str:
        with self._lock:
            if client_id not in self._clients:
                raise KeyError(f"unknown client {client_id!r}; register_client() first")
            rt = "rt_" + secrets.token_urlsafe(24)
            self._refresh[rt] = _RefreshToken(user=user, client_id=client_id)
            return rt

    def issue_access_token(self, user: str, lifetime: float | None = None) -> str:
        """An access token for ``user`` valid ``lifetime`` seconds (default: the setting)."""
        with self._lock:
            if lifetime is None:
                lifetime = self.access_token_lifetime
            token = "at_" + secrets.token_urlsafe(32)
            if self.access_token_length > len(token):
                pad = secrets.token_urlsafe(self.access_token_length)
                token = (token + pad)[: self.access_token_length]
            self._access[token] = _AccessToken(user=user, expires_at=time.time() + lifetime)
            return token

    def revoke_refresh_token(self, rt: str) -> None:
        with self._lock:
            if rt in self._refresh:
                self._refresh[rt].revoked = True

    def invalidate_access_tokens(self, user: str | None = None) -> int:
        """Revoke all unexpired access tokens (of ``user`` if given); returns how many."""
        n = 0
        with self._lock:
            for at in self._access.values():
                if not at.revoked and (user is None or at.user == user):
                    at.revoked = True
                    n += 1
        return n

    def fail_next(
        self,
        status: int,
        count: int = 1,
        body: bytes | str | dict[str, Any] | None = None,
        content_type: str | None = None,
    ) -> None:
        """Answer the next ``count`` /token requests with ``status`` (e.g. 503 or 429).

        ``body`` may be a dict (sent as JSON), str or bytes; by default a JSON
        ``temporarily_unavailable`` error. Requests answered this way are still logged.
        """
        if body is None:
            body = {
                "error": "temporarily_unavailable",
                "error_description": f"injected failure {status}",
            }
        if isinstance(body, dict):
            raw = json.dumps(body).encode()
            ctype = content_type or "application/json"
        elif isinstance(body, str):
            raw = body.encode()
            ctype = content_type or "text/plain; charset=utf-8"
        else:
            raw = body
            ctype = content_type or "application/octet-stream"
        with self._lock:
            for _ in range(count):
                self._failures.append(_Failure(status, raw, ctype))

    def reset_log(self) -> None:
        with self._lock:
            self.token_requests.clear()
            self.introspection_requests.clear()
            self.authorize_requests.clear()
            self.device_polls.clear()

    def reset_settings(self) -> None:
        """Put the per-test settings back to defaults, drop pending injected failures and
        forget the device codes handed out (an earlier test's code left pending must not look
        like this test's)."""
        with self._lock:
            self._devices.clear()
            self.access_token_lifetime = DEFAULT_ACCESS_TOKEN_LIFETIME
            self.rotate_refresh_tokens = False
            self.retire_rotated_on_first_use = False
            self.access_token_length = 0
            self.token_delay = 0.0
            self.scope = DEFAULT_SCOPE
            self.consent_user = None
            self.deny_authorization = False
            self.authorization_refresh_tokens = "always"
            self.authorization_code_lifetime = DEFAULT_AUTHORIZATION_CODE_LIFETIME
            self.device_code_lifetime = DEFAULT_DEVICE_CODE_LIFETIME
            self.device_interval = DEFAULT_DEVICE_INTERVAL
            self.device_slow_down_step = DEFAULT_DEVICE_SLOW_DOWN_STEP
            self.https_redirects = set()
            self._failures.clear()

    # ---------------------------------------------------------------- queries

    def token_info(self, token: str) -> dict[str, Any]:
        """RFC 7662 answer for ``token``."""
        with self._lock:
            at = self._access.get(token)
            now = time.time()
            if at is None or at.revoked or at.expires_at <= now:
                self.introspection_requests.append((token, False))
                return {"active": False}
            self.introspection_requests.append((token, True))
            return {
                "active": True,
                "email": at.user,
                "username": at.user,
                "sub": at.user,
                "scope": self.scope,
                "token_type": "Bearer",
                "exp": int(at.expires_at),
                "iat": int(now),
            }

    def requests_for(self, grant_type: str | None = None) -> list[tuple[str, str | None, float]]:
        with self._lock:
            return [r for r in self.token_requests if grant_type in (None, r[0])]

    # ------------------------------------------------------------ token logic

    def _take_failure(self) -> _Failure | None:
        with self._lock:
            return self._failures.popleft() if self._failures else None

    def _log(self, grant_type: str, user: str | None) -> None:
        with self._lock:
            self.token_requests.append((grant_type, user, time.time()))

    def _authenticate_client(
        self, form: dict[str, str], basic: tuple[str, str] | None, audience: str | None
    ) -> _Client:
        """The client of this request, by secret (basic or post), assertion or none (public)."""
        client_id: str | None
        client_secret: str | None
        if basic is not None:  # client_secret_basic
            client_id, client_secret = basic
        else:  # client_secret_post (or no secret at all)
            client_id, client_secret = form.get("client_id"), form.get("client_secret")
        if "client_assertion_type" in form or "client_assertion" in form:
            return self._authenticate_assertion(form, client_id, audience)
        with self._lock:
            client = self._clients.get(client_id or "")
        if client is None:
            raise OAuthError(401, "invalid_client", "unknown client or no client authentication")
        if client_secret is None:
            if client.client_secret is None and client.certificate is None:
                return client  # a public client
            raise OAuthError(401, "invalid_client", "unknown client or no client authentication")
        if client.client_secret is None:
            raise OAuthError(401, "invalid_client", "this client has no secret; it must not "
                             "send one")
        if not secrets.compare_digest(client.client_secret, client_secret):
            raise OAuthError(401, "invalid_client", "bad client secret")
        return client

    def _authenticate_assertion(
        self, form: dict[str, str], client_id: str | None, audience: str | None
    ) -> _Client:
        """RFC 7523 section 2.2: a JWT signed with the client certificate's key."""
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            raise OAuthError(401, "invalid_client", "unsupported client_assertion_type")
        jwt = _Jwt.parse(form.get("client_assertion", ""), 401, "invalid_client")
        claims = jwt.claims
        client_id = client_id or _claim_str(claims, "iss")
        with self._lock:
            client = self._clients.get(client_id or "")
        if client is None or client.certificate is None:
            raise OAuthError(401, "invalid_client", "unknown client or no certificate registered")
        if claims.get("iss") != client.client_id or claims.get("sub") != client.client_id:
            raise OAuthError(401, "invalid_client", "assertion iss and sub must be the client_id")
        der = client.certificate.public_bytes(serialization.Encoding.DER)
        if jwt.header.get("x5t") != _b64url(hashlib.sha1(der, usedforsecurity=False).digest()):
            raise OAuthError(401, "invalid_client", "x5t is not the registered certificate's "
                             "thumbprint")
        s256 = jwt.header.get("x5t#S256")
        if s256 is not None and s256 != _b64url(hashlib.sha256(der).digest()):
            raise OAuthError(401, "invalid_client", "x5t#S256 is not the registered "
                             "certificate's thumbprint")
        public_key = client.certificate.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise OAuthError(401, "invalid_client", "certificate has no RSA key")
        jwt.verify(public_key, 401, "invalid_client")
        jwt.check_audience_and_time(audience, 401, "invalid_client", max_lifetime=600)
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise OAuthError(401, "invalid_client", "assertion has no jti")
        with self._lock:
            if jti in self._seen_jti:
                raise OAuthError(401, "invalid_client", "assertion replayed (jti seen before)")
            self._seen_jti.add(jti)
        return client

    def _token_answer(self, user: str) -> dict[str, Any]:
        with self._lock:
            lifetime = self.access_token_lifetime
            token = self.issue_access_token(user, lifetime)
            return {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": int(lifetime),
                "scope": self.scope,
            }

    def _refresh_for_authorization(self, offline: bool) -> bool:
        policy = self.authorization_refresh_tokens
        return policy == "always" or (policy == "offline" and offline)

    def handle_token(
        self,
        form: dict[str, str],
        basic: tuple[str, str] | None,
        token_url: str | None = None,
    ) -> dict[str, Any]:
        """Process a /token request; raises :class:`OAuthError`.

        ``token_url``: this endpoint's address, the audience assertions must name.
        """
        grant_type = form.get("grant_type", "")
        if grant_type == "refresh_token":
            with self._lock:
                rt = self._refresh.get(form.get("refresh_token", ""))
                self._log(grant_type, rt.user if rt else None)
                client = self._authenticate_client(form, basic, token_url)
                if rt is None or rt.revoked:
                    raise OAuthError(400, "invalid_grant", "refresh token unknown or revoked")
                if rt.client_id != client.client_id:
                    raise OAuthError(400, "invalid_grant", "refresh token of another client")
                answer = self._token_answer(rt.user)
                if rt.predecessor is not None:
                    rt.predecessor.revoked = True
                    rt.predecessor = None
                if self.rotate_refresh_tokens:
                    new = self.issue_refresh_token(rt.user, rt.client_id)
                    answer["refresh_token"] = new
                    if self.retire_rotated_on_first_use:
                        self._refresh[new].predecessor = rt
                    else:
                        rt.revoked = True
                return answer
        if grant_type == "client_credentials":
            with self._lock:
                self._log(grant_type, None)
                client = self._authenticate_client(form, basic, token_url)
                if client.app_only_user is None:
                    raise OAuthError(
                        400, "unauthorized_client", "client not allowed client_credentials"
                    )
                self.token_requests[-1] = (grant_type, client.app_only_user, time.time())
                return self._token_answer(client.app_only_user)
        if grant_type == "authorization_code":
            with self._lock:
                # Single use: gone even when this request fails.
                code = self._codes.pop(form.get("code", ""), None)
                self._log(grant_type, code.user if code else None)
                client = self._authenticate_client(form, basic, token_url)
                return self._redeem_code(code, client, form)
        if grant_type == DEVICE_CODE_GRANT:
            with self._lock:
                device = self._devices.get(form.get("device_code", ""))
                self._log(grant_type, device.user if device else None)
                client = self._authenticate_client(form, basic, token_url)
                try:
                    answer = self._poll_device(device, client)
                except OAuthError as e:
                    self.device_polls.append((device.user_code if device else "", e.error))
                    raise
                assert device is not None
                self.device_polls.append((device.user_code, "ok"))
                self.token_requests[-1] = (grant_type, device.user, time.time())
                return answer
        if grant_type == JWT_BEARER_GRANT:
            with self._lock:
                self._log(grant_type, None)
                return self._jwt_bearer(form, token_url)
        self._log(grant_type, None)
        raise OAuthError(400, "unsupported_grant_type", f"grant_type {grant_type!r}")

    def _redeem_code(
        self, code: _AuthorizationCode | None, client: _Client, form: dict[str, str]
    ) -> dict[str, Any]:
        if code is None:
            raise OAuthError(400, "invalid_grant", "authorization code unknown or already used")
        if code.expires_at <= time.time():
            raise OAuthError(400, "invalid_grant", "authorization code expired")
        if code.client_id != client.client_id:
            raise OAuthError(400, "invalid_grant", "authorization code of another client")
        if form.get("redirect_uri") != code.redirect_uri:
            raise OAuthError(400, "invalid_grant", "redirect_uri differs from the one in the "
                             "authorization request")
        verifier = form.get("code_verifier", "")
        if not 43 <= len(verifier) <= 128:
            raise OAuthError(400, "invalid_grant", "code_verifier missing or of a wrong length")
        if not secrets.compare_digest(_s256(verifier), code.code_challenge):
            raise OAuthError(400, "invalid_grant", "PKCE verification failed: code_verifier "
                             "does not match code_challenge")
        answer = self._token_answer(code.user)
        if self._refresh_for_authorization(code.offline):
            answer["refresh_token"] = self.issue_refresh_token(code.user, client.client_id)
        return answer

    def _poll_device(self, device: _DeviceCode | None, client: _Client) -> dict[str, Any]:
        if device is None:
            raise OAuthError(400, "invalid_grant", "device code unknown or already used")
        if device.client_id != client.client_id:
            raise OAuthError(400, "invalid_grant", "device code of another client")
        now = time.time()
        if now >= device.expires_at:
            del self._devices[device.device_code]
            raise OAuthError(400, "expired_token", "the device code has expired")
        last, device.last_poll = device.last_poll, now
        if last is not None and now - last < device.interval:
            # RFC 8628 3.5: this and every later request must wait that much longer.
            device.interval += self.device_slow_down_step
            raise OAuthError(400, "slow_down", "polling too fast")
        if device.denied:
            del self._devices[device.device_code]
            raise OAuthError(400, "access_denied", "the user declined")
        if device.user is None:
            raise OAuthError(400, "authorization_pending", "the user has not signed in yet")
        del self._devices[device.device_code]
        answer = self._token_answer(device.user)
        offline = "offline_access" in device.scope.split()
        if self._refresh_for_authorization(offline):
            answer["refresh_token"] = self.issue_refresh_token(device.user, client.client_id)
        return answer

    def _jwt_bearer(self, form: dict[str, str], token_url: str | None) -> dict[str, Any]:
        """Google's service account grant (RFC 7523 section 2.1): a token for ``sub``."""
        jwt = _Jwt.parse(form.get("assertion", ""), 400, "invalid_grant")
        issuer = _claim_str(jwt.claims, "iss")
        key = self._service_accounts.get(issuer or "")
        if key is None:
            raise OAuthError(400, "invalid_grant", "unknown service account (iss)")
        jwt.verify(key, 400, "invalid_grant")
        jwt.check_audience_and_time(token_url, 400, "invalid_grant", max_lifetime=3600)
        if not _claim_str(jwt.claims, "scope"):
            raise OAuthError(400, "invalid_scope", "Empty or missing scope not allowed.")
        user = _claim_str(jwt.claims, "sub") or issuer
        assert user is not None
        self.token_requests[-1] = (JWT_BEARER_GRANT, user, time.time())
        return self._token_answer(user)

    # ----------------------------------------------------- authorization endpoints

    def handle_authorize(self, query: dict[str, str]) -> tuple[int, str]:
        """GET /authorize: (302, Location) after the automatic consent, or (400, reason)."""
        with self._lock:
            self.authorize_requests.append(dict(query))
            client = self._clients.get(query.get("client_id", ""))
            if client is None:
                return 400, "unknown client_id"
            redirect_uri = query.get("redirect_uri", "")
            if not (_is_loopback_redirect(redirect_uri) or redirect_uri in self.https_redirects):
                return 400, ("redirect_uri must be a loopback http:// address or a registered "
                             "https:// one")
            state = query.get("state")

            def back(**params: str) -> tuple[int, str]:
                if state is not None:
                    params["state"] = state
                joiner = "&" if "?" in redirect_uri else "?"
                return 302, redirect_uri + joiner + urlencode(params)

            if query.get("response_type") != "code":
                return back(error="unsupported_response_type",
                            error_description="only response_type=code")
            challenge = query.get("code_challenge", "")
            if query.get("code_challenge_method") != "S256" or len(challenge) != 43:
                return back(error="invalid_request",
                            error_description="PKCE with code_challenge_method=S256 is required")
            if self.deny_authorization:
                return back(error="access_denied",
                            error_description="The user declined to grant access.")
            user = self.consent_user or query.get("login_hint")
            if not user:
                return back(error="login_required", error_description="no user signed in")
            scope = query.get("scope", "")
            code = "code_" + secrets.token_urlsafe(24)
            self._codes[code] = _AuthorizationCode(
                client_id=client.client_id,
                redirect_uri=redirect_uri,
                code_challenge=challenge,
                user=user,
                scope=scope,
                offline="offline_access" in scope.split() or query.get("access_type") == "offline",
                expires_at=time.time() + self.authorization_code_lifetime,
            )
            return back(code=code)

    def handle_device_authorization(
        self, form: dict[str, str], basic: tuple[str, str] | None, base_url: str
    ) -> dict[str, Any]:
        """POST /devicecode (RFC 8628 section 3.1)."""
        with self._lock:
            client = self._authenticate_client(form, basic, base_url + "/devicecode")
            letters = "BCDFGHJKLMNPQRSTVWXZ"  # no vowels: no words, no 0/O confusion
            user_code = "-".join("".join(secrets.choice(letters) for _ in range(4))
                                 for _ in range(2))
            device = _DeviceCode(
                device_code="dc_" + secrets.token_urlsafe(24),
                user_code=user_code,
                client_id=client.client_id,
                scope=form.get("scope", ""),
                expires_at=time.time() + self.device_code_lifetime,
                interval=self.device_interval,
            )
            self._devices[device.device_code] = device
            verification_uri = base_url + "/device"
            return {
                "device_code": device.device_code,
                "user_code": user_code,
                "verification_uri": verification_uri,
                "verification_uri_complete": verification_uri + "?" + urlencode(
                    {"user_code": user_code}),
                "expires_in": _number(self.device_code_lifetime),
                "interval": _number(self.device_interval),
                "message": f"To sign in, open {verification_uri} and enter {user_code}.",
            }


# ----------------------------------------------------------------- JWT checks


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _s256(verifier: str) -> str:
    return _b64url(hashlib.sha256(verifier.encode("ascii", "replace")).digest())


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _claim_str(claims: dict[str, Any], name: str) -> str | None:
    value = claims.get(name)
    return value if isinstance(value, str) and value else None


def _is_loopback_redirect(uri: str) -> bool:
    parts = urlsplit(uri)
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


@dataclass
class _Jwt:
    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes

    @classmethod
    def parse(cls, token: str, status: int, error: str) -> _Jwt:
        parts = token.split(".")
        if len(parts) != 3:
            raise OAuthError(status, error, "assertion is not a compact JWS")
        try:
            decoded = [base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in parts]
            header, claims = json.loads(decoded[0]), json.loads(decoded[1])
        except (binascii.Error, ValueError):
            raise OAuthError(status, error, "assertion is not valid base64url JSON") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise OAuthError(status, error, "assertion header and claims must be objects")
        if header.get("alg") != "RS256":
            raise OAuthError(status, error, "assertion alg must be RS256")
        return cls(header, claims, (parts[0] + "." + parts[1]).encode("ascii"), decoded[2])

    def verify(self, key: rsa.RSAPublicKey, status: int, error: str) -> None:
        try:
            key.verify(self.signature, self.signing_input, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise OAuthError(status, error, "Invalid JWT Signature.") from None

    def check_audience_and_time(
        self, audience: str | None, status: int, error: str, *, max_lifetime: float
    ) -> None:
        aud = self.claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if audience is None or audience not in auds:
            raise OAuthError(status, error, f"Invalid JWT: aud must be {audience}")
        now = time.time()
        exp, iat, nbf = (self.claims.get(k) for k in ("exp", "iat", "nbf"))
        if not isinstance(exp, int | float) or exp <= now:
            raise OAuthError(status, error, "Invalid JWT: expired or no exp")
        if isinstance(iat, int | float):
            if iat > now + JWT_LEEWAY or exp - iat > max_lifetime:
                raise OAuthError(status, error, "Invalid JWT: Token must be a short-lived "
                                 "token and in a reasonable timeframe")
        elif exp - now > max_lifetime:
            raise OAuthError(status, error, "Invalid JWT: lifetime too long")
        if isinstance(nbf, int | float) and nbf > now + JWT_LEEWAY:
            raise OAuthError(status, error, "Invalid JWT: not yet valid (nbf)")


# ------------------------------------------------------------------ HTTP layer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, addr: tuple[str, int], authority: TokenAuthority, role: str) -> None:
        self.authority = authority
        self.role = role
        super().__init__(addr, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: no lingering keep-alives

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", extra or {})

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        return {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}

    def _basic(self) -> tuple[str, str] | None:
        auth = self.headers.get("Authorization", "")
        if not auth.lower().startswith("basic "):
            return None
        try:
            decoded = base64.b64decode(auth[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return ("", "")
        user, _, password = decoded.partition(":")
        # RFC 6749 2.3.1: client_id and secret are form-urlencoded before Basic encoding
        return unquote_plus(user), unquote_plus(password)

    @property
    def _base_url(self) -> str:
        port = self.server.server_address[1]
        return f"http://127.0.0.1:{port}"  # the listener binds nothing else

    def _page(self, status: int, text: str, extra: dict[str, str] | None = None) -> None:
        body = f"<!doctype html><title>token server</title><p>{html.escape(text)}</p>"
        self._send(status, body.encode(), "text/html; charset=utf-8", extra or {})

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if self.server.role == "token" and path == "/authorize":
            params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
            status, result = self.server.authority.handle_authorize(params)
            if status == 302:
                self._page(302, "redirecting", {"Location": result})
            else:
                self._page(status, result)
            return
        if self.server.role == "token" and path == "/device":
            self._page(200, "Enter the code shown by the device (tests approve it with "
                       "TokenAuthority.approve_device).")
            return
        self._json(405, {"error": "invalid_request", "error_description": "use POST"})

    def _oauth_error(self, e: OAuthError) -> None:
        extra = {"WWW-Authenticate": 'Basic realm="token"'} if e.status == 401 else {}
        self._json(e.status, {"error": e.error, "error_description": e.description}, extra)

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        authority = self.server.authority
        if self.server.role == "token" and path == "/devicecode":
            try:
                answer = authority.handle_device_authorization(
                    self._form(), self._basic(), self._base_url)
            except OAuthError as e:
                self._oauth_error(e)
                return
            self._json(HTTPStatus.OK, answer)
            return
        if self.server.role == "introspect":
            if path != "/introspect":
                self._json(404, {"error": "not_found"})
                return
            form = self._form()
            token = form.get("token", "")
            self._json(200, authority.token_info(token))
            return
        if path != "/token":
            self._json(404, {"error": "not_found"})
            return
        form = self._form()
        basic = self._basic()
        delay = authority.token_delay
        if delay > 0:
            time.sleep(delay)
        failure = authority._take_failure()
        if failure is not None:
            authority._log(form.get("grant_type", ""), None)
            extra = {"Retry-After": "1"} if failure.status in (429, 503) else {}
            self._send(failure.status, failure.body, failure.content_type, extra)
            return
        try:
            answer = authority.handle_token(form, basic, self._base_url + "/token")
        except OAuthError as e:
            self._oauth_error(e)
            return
        self._json(HTTPStatus.OK, answer)


class _Listener:
    def __init__(self, authority: TokenAuthority, role: str, port: int = 0) -> None:
        self.httpd = _Server(("127.0.0.1", port), authority, role)
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"tokenserver-{role}-{self.port}",
            daemon=True,
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class TokenServer:
    """Token and introspection listeners on 127.0.0.1 sharing one :class:`TokenAuthority`."""

    def __init__(self, authority: TokenAuthority | None = None) -> None:
        self.authority = authority if authority is not None else TokenAuthority()
        self._introspect: _Listener | None = _Listener(self.authority, "introspect")
        self._token: _Listener | None = _Listener(self.authority, "token")
        self.host = "127.0.0.1"
        self.token_port = self._token.port
        self.introspection_port = self._introspect.port

    @property
    def token_url(self) -> str:
        return f"http://{self.host}:{self.token_port}/token"

    @property
    def authorize_url(self) -> str:
        return f"http://{self.host}:{self.token_port}/authorize"

    @property
    def device_authorization_url(self) -> str:
        return f"http://{self.host}:{self.token_port}/devicecode"

    @property
    def introspection_url(self) -> str:
        return f"http://{self.host}:{self.introspection_port}/introspect"

    @property
    def token_listener_running(self) -> bool:
        return self._token is not None

    def stop_token_listener(self) -> None:
        """Close the token listener: new connections to ``token_url`` are refused."""
        if self._token is not None:
            self._token.close()
            self._token = None

    def start_token_listener(self) -> None:
        """Listen again on the same port (no-op if already listening)."""
        if self._token is None:
            self._token = self._relisten("token", self.token_port)

    def stop_introspection_listener(self) -> None:
        """Close the introspection listener: Dovecot answers logins with a temporary failure
        (IMAP ``NO [UNAVAILABLE]``, POP3 ``-ERR [SYS/TEMP]``)."""
        if self._introspect is not None:
            self._introspect.close()
            self._introspect = None

    def start_introspection_listener(self) -> None:
        """Listen again on the same introspection port (no-op if already listening)."""
        if self._introspect is None:
            self._introspect = self._relisten("introspect", self.introspection_port)

    def _relisten(self, role: str, port: int) -> _Listener:
        deadline = time.monotonic() + 5
        while True:
            try:
                return _Listener(self.authority, role, port)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.stop_token_listener()
        if self._introspect is not None:
            self._introspect.close()
            self._introspect = None

    def __enter__(self) -> TokenServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
