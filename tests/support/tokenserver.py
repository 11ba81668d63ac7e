"""A real OAuth2 token endpoint (RFC 6749) and introspection endpoint (RFC 7662) for tests.

Stdlib only. Each listener is a ``ThreadingHTTPServer`` served from a daemon thread, so it
works whatever event loop (or none) a test runs in. Two listeners share one
:class:`TokenAuthority`:

* the *token* listener (``POST /token``), which the proxy talks to, and
* the *introspection* listener (``POST /introspect``), which Dovecot talks to.

Tests can take the token listener down (connection refused) and bring it back on the same
port while Dovecot keeps validating tokens through the introspection listener.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote_plus

DEFAULT_ACCESS_TOKEN_LIFETIME = 3600
DEFAULT_SCOPE = "mail"
# The ``token_server`` fixture registers this client (no app-only user).
TEST_CLIENT_ID = "mailproxy-test-client"
TEST_CLIENT_SECRET = "mailproxy-test-secret"


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
    client_secret: str
    app_only_user: str | None


@dataclass
class _RefreshToken:
    user: str
    client_id: str
    revoked: bool = False


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
    * ``access_token_length``: pad access tokens to this many characters (0 = natural length)
    * ``token_delay``: seconds to sleep before answering ``/token``
    """

    access_token_lifetime: float = DEFAULT_ACCESS_TOKEN_LIFETIME
    rotate_refresh_tokens: bool = False
    access_token_length: int = 0
    token_delay: float = 0.0
    scope: str = DEFAULT_SCOPE
    # (grant_type, user or None, time.time()) for every /token request, in arrival order
    token_requests: list[tuple[str, str | None, float]] = field(default_factory=list)
    # (token, active) for every /introspect request
    introspection_requests: list[tuple[str, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._clients: dict[str, _Client] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._access: dict[str, _AccessToken] = {}
        self._failures: deque[_Failure] = deque()

    # ----------------------------------------------------------------- controls

    def register_client(
        self, client_id: str, client_secret: str, app_only_user: str | None = None
    ) -> None:
        """Register (or replace) an OAuth client.

        ``app_only_user`` is the mailbox that ``client_credentials`` tokens of this client
        are valid for (the proxy takes the mailbox address from its config).
        """
        with self._lock:
            self._clients[client_id] = _Client(client_id, client_secret, app_only_user)

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

    def reset_settings(self) -> None:
        """Put the per-test settings back to defaults and drop pending injected failures."""
        with self._lock:
            self.access_token_lifetime = DEFAULT_ACCESS_TOKEN_LIFETIME
            self.rotate_refresh_tokens = False
            self.access_token_length = 0
            self.token_delay = 0.0
            self.scope = DEFAULT_SCOPE
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

    def _authenticate_client(self, client_id: str | None, client_secret: str | None) -> _Client:
        with self._lock:
            client = self._clients.get(client_id or "")
        if client is None or client_secret is None:
            raise OAuthError(401, "invalid_client", "unknown client or no client authentication")
        if not secrets.compare_digest(client.client_secret, client_secret):
            raise OAuthError(401, "invalid_client", "bad client secret")
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

    def handle_token(self, form: dict[str, str], basic: tuple[str, str] | None) -> dict[str, Any]:
        """Process a /token request; raises :class:`OAuthError`."""
        grant_type = form.get("grant_type", "")
        client_id: str | None
        client_secret: str | None
        if basic is not None:  # client_secret_basic
            client_id, client_secret = basic
        else:  # client_secret_post
            client_id, client_secret = form.get("client_id"), form.get("client_secret")
        if grant_type == "refresh_token":
            with self._lock:
                rt = self._refresh.get(form.get("refresh_token", ""))
                self._log(grant_type, rt.user if rt else None)
                client = self._authenticate_client(client_id, client_secret)
                if rt is None or rt.revoked:
                    raise OAuthError(400, "invalid_grant", "refresh token unknown or revoked")
                if rt.client_id != client.client_id:
                    raise OAuthError(400, "invalid_grant", "refresh token of another client")
                answer = self._token_answer(rt.user)
                if self.rotate_refresh_tokens:
                    rt.revoked = True
                    answer["refresh_token"] = self.issue_refresh_token(rt.user, rt.client_id)
                return answer
        if grant_type == "client_credentials":
            with self._lock:
                self._log(grant_type, None)
                client = self._authenticate_client(client_id, client_secret)
                if client.app_only_user is None:
                    raise OAuthError(
                        400, "unauthorized_client", "client not allowed client_credentials"
                    )
                self.token_requests[-1] = (grant_type, client.app_only_user, time.time())
                return self._token_answer(client.app_only_user)
        self._log(grant_type, None)
        raise OAuthError(400, "unsupported_grant_type", f"grant_type {grant_type!r}")


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

    def do_GET(self) -> None:
        self._json(405, {"error": "invalid_request", "error_description": "use POST"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        authority = self.server.authority
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
            answer = authority.handle_token(form, basic)
        except OAuthError as e:
            extra = {"WWW-Authenticate": 'Basic realm="token"'} if e.status == 401 else {}
            self._json(e.status, {"error": e.error, "error_description": e.description}, extra)
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
