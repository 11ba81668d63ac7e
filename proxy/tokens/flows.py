"""The first grant for an account: OAuth2 authorization flows run by ``mailproxy authorize``.

:func:`authorize` runs the account's flow (authorization code with PKCE and a loopback redirect,
or with the redirect address pasted by hand; device code; client credentials; service account)
and returns a :class:`Grant` for the caller to store. :func:`client_auth_params` and
:func:`app_token_form` build the parts of token requests that the token manager needs too.
"""

from __future__ import annotations

import asyncio
import html
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
from authlib.oauth2.rfc6749.parameters import (  # type: ignore[import-untyped]
    prepare_grant_uri,
)
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]

from ..config import Account
from ..providers import PRESETS
from .assertion import (
    CredentialError,
    client_assertion,
    load_certificate_credential,
    load_service_account,
    service_account_assertion,
)
from .manager import parse_expires_in

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

# RFC 8628: poll every 5 s unless told otherwise, 5 s slower after each slow_down.
DEFAULT_INTERVAL = 5.0
SLOW_DOWN_STEP = 5.0
# RFC 8628 makes expires_in mandatory; if a server leaves it out, stop after this long.
DEFAULT_DEVICE_LIFETIME = 900.0
# The person watching the device flow is told how long the code still lives this often.
COUNTDOWN_EVERY = 60.0
# A browser (or a port scanner) that opens a connection to the loopback listener and sends
# nothing must not hold it open.
LOOPBACK_READ_TIMEOUT = 10.0
PASTE_ATTEMPTS = 3
_DESCRIPTION_MAX = 400
# Form fields whose values must never appear in an error text, even echoed by a server.
_SECRET_FIELDS = ("client_secret", "client_assertion", "assertion", "code", "code_verifier",
                  "device_code", "refresh_token")


class FlowError(Exception):
    """Authorization did not complete; the text says what to do and holds no secret."""


class Console(Protocol):
    """How a flow talks to the person running it (the CLI: stderr, stdin, webbrowser)."""

    def say(self, text: str) -> None: ...

    def ask(self, prompt: str) -> str:
        """One line typed by the person; EOFError when there is none."""
        ...

    def open_browser(self, url: str) -> bool:
        """False when no browser could be started."""
        ...


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


# --------------------------------------------------------------------------- token requests


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


def _token_url(account: Account) -> str:
    if not account.token_url:  # the config fills it in for presets and requires it for custom
        raise FlowError(f"{account.address}: no token_url configured")
    return account.token_url


def app_token_form(account: Account, *, now: float) -> dict[str, str]:
    """The whole token request form for the flows that need no refresh token."""
    token_url = _token_url(account)
    scope = " ".join(account.scopes or ())
    if account.flow == "client_credentials":
        form = {"grant_type": "client_credentials", "client_id": account.client_id}
        if scope:
            form["scope"] = scope
        form.update(client_auth_params(account, token_url, now=now))
        return form
    if account.flow == "service_account":
        assert account.service_account_file is not None  # the config requires it for this flow
        try:
            key = load_service_account(account.service_account_file)
        except CredentialError as exc:
            raise FlowError(f"{account.address}: {exc}") from None
        assertion = service_account_assertion(key, account.address, account.scopes or (),
                                              token_url, now=now)
        return {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}
    raise FlowError(f"{account.address}: flow {account.flow!r} gets its tokens from a sign-in, "
                    f"not from a token request alone; run `mailproxy authorize {account.address}`")


class _Refused(Exception):
    """An OAuth error answer (RFC 6749 section 5.2)."""

    def __init__(self, error: str, description: str | None) -> None:
        super().__init__(error)
        self.error = error
        self.description = description

    def text(self) -> str:
        return f"{self.error} ({self.description})" if self.description else self.error


class _Unreachable(FlowError):
    """Network trouble, a timeout, 429 or 5xx: the device flow keeps polling through these."""


def _scrub(text: str, form: Mapping[str, str]) -> str:
    for name in _SECRET_FIELDS:
        value = form.get(name)
        if value and len(value) >= 6:
            text = text.replace(value, "[redacted]")
    return text


def _clean(value: Any, form: Mapping[str, str]) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())  # no line breaks or control characters from a server
    return _scrub(text, form)[:_DESCRIPTION_MAX] or None


async def _post(http: httpx.AsyncClient, url: str, form: dict[str, str]) -> dict[str, Any]:
    """POST ``form``; the JSON answer, or _Refused / _Unreachable / FlowError."""
    host = urlsplit(url).netloc
    try:
        response = await http.post(url, data=form, headers={"Accept": "application/json"})
    except httpx.TimeoutException:
        raise _Unreachable(f"{host} did not answer in time; check the network and try "
                           "again") from None
    except httpx.HTTPError as exc:
        detail = _scrub(f"{type(exc).__name__}: {exc}", form)
        raise _Unreachable(f"cannot reach {url} ({detail}); check the network, a proxy or the "
                           "configured URL") from None
    status = response.status_code
    if status in (408, 429) or status >= 500:
        raise _Unreachable(f"{host} answered HTTP {status}; the provider has trouble, try "
                           "again later")
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise FlowError(f"{url} answered HTTP {status} with something other than a JSON "
                        "object; is the URL right?")
    if "error" in body or status >= 400:
        error = _clean(body.get("error"), form) or f"HTTP {status}"
        raise _Refused(error, _clean(body.get("error_description"), form))
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


def _refusal(account: Account, what: str, refused: _Refused) -> FlowError:
    hints = [hint for code, hint in _AADSTS_HINTS.items() if code in (refused.description or "")]
    if not hints and refused.error in _ERROR_HINTS:
        hints.append(_ERROR_HINTS[refused.error])
    hint = f": {hints[0]}" if hints else ""
    return FlowError(f"{account.address}: {what} was refused: {refused.text()}{hint}.")


async def _token(http: httpx.AsyncClient, account: Account, url: str, form: dict[str, str],
                 what: str) -> dict[str, Any]:
    try:
        return await _post(http, url, form)
    except _Refused as refused:
        raise _refusal(account, what, refused) from None
    except FlowError as exc:
        raise FlowError(f"{account.address}: {what} failed: {exc}") from None


def _grant(account: Account, answer: dict[str, Any], now: float, *, refresh: bool) -> Grant:
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


# ------------------------------------------------------------------------ the entry point


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
    token_url = _token_url(account)
    async with httpx.AsyncClient(timeout=request_timeout, transport=transport) as http:
        if account.flow == "authorization_code":
            return await _authorization_code(account, console, http, token_url, manual=manual,
                                             timeout=timeout, clock=clock)
        if account.flow == "device_code":
            return await _device_code(account, console, http, token_url, clock=clock,
                                      sleep=sleep)
        now = clock()
        form = app_token_form(account, now=now)
        answer = await _token(http, account, token_url, form, f"the {account.flow} request")
        return _grant(account, answer, now, refresh=False)


# ------------------------------------------------------------------ authorization code


def authorization_url(account: Account, redirect_uri: str, state: str, code_verifier: str) -> str:
    if not account.authorize_url:
        raise FlowError(f"{account.address}: no authorize_url configured for the "
                        "authorization_code flow")
    preset = PRESETS.get(account.provider)
    extra = dict(preset.authorize_params) if preset else {}
    extra.setdefault("login_hint", account.address)  # preselects the account at the provider
    url: str = prepare_grant_uri(
        account.authorize_url, account.client_id, "code", redirect_uri=redirect_uri,
        scope=" ".join(account.scopes or ()) or None, state=state,
        code_challenge=create_s256_code_challenge(code_verifier),
        code_challenge_method="S256", **extra)
    return url


@dataclass(frozen=True)
class Redirect:
    """The query of the address the provider sent the browser back to."""

    code: str | None
    state: str | None
    error: str | None
    error_description: str | None


def _first(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values and values[0] else None


def parse_redirect_query(query: str) -> Redirect:
    q = parse_qs(query, keep_blank_values=True)
    return Redirect(_first(q, "code"), _first(q, "state"), _first(q, "error"),
                    _first(q, "error_description"))


def parse_pasted(text: str) -> Redirect | None:
    """What the person pasted: the whole redirect address, its query, or the bare code.

    None: nothing usable.
    """
    text = text.strip().strip("<>\"'").strip()
    if not text:
        return None
    if "://" in text or "?" in text or "#" in text or re.match(r"(code|state|error)=", text):
        base, _, fragment = text.partition("#")
        if "?" in base:
            query = base.partition("?")[2]
        else:  # "code=...&state=..." alone, or an address whose answer is in the fragment
            query = "" if "://" in base or base.startswith("/") else base
        found = parse_redirect_query(query)
        if found.code is None and found.error is None and fragment:
            found = parse_redirect_query(fragment)  # response_mode=fragment
        return found if found.code or found.error else None
    if any(c.isspace() for c in text):
        return None
    if re.search(r"%[0-9A-Fa-f]{2}", text):
        text = unquote(text)  # copied from an address bar: Google codes start "4%2F0A..."
    return Redirect(text, None, None, None)


def _provider_error(account: Account, redirect: Redirect) -> FlowError:
    description = _clean(redirect.error_description, {})
    detail = f"{redirect.error} ({description})" if description else str(redirect.error)
    return FlowError(f"{account.address}: the sign-in did not complete; the provider answered "
                     f"{detail}. Run `mailproxy authorize {account.address}` again and accept "
                     "the requested access.")


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _with_port(uri: str, port: int) -> str:
    parts = urlsplit(uri)
    host = parts.hostname or "127.0.0.1"
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return parts._replace(netloc=netloc, path=parts.path or "/").geturl()


async def _authorization_code(
    account: Account,
    console: Console,
    http: httpx.AsyncClient,
    token_url: str,
    *,
    manual: bool,
    timeout: float,
    clock: Callable[[], float],
) -> Grant:
    verifier = secrets.token_urlsafe(64)  # 86 characters; RFC 7636 wants 43 to 128
    state = secrets.token_urlsafe(24)
    if manual:
        redirect_uri = _manual_redirect_uri(account.redirect_uri)
        url = authorization_url(account, redirect_uri, state, verifier)
        code = _ask_for_code(account, console, url, state, redirect_uri)
    else:
        loopback = await _Loopback.start(account, state)
        try:
            redirect_uri = loopback.redirect_uri
            url = authorization_url(account, redirect_uri, state, verifier)
            console.say(f"To authorize {account.address}, open this address in a browser and "
                        f"sign in:\n\n  {url}\n")
            if console.open_browser(url):
                console.say(f"Waiting up to {_duration(timeout)} for the browser to come back "
                            "(Ctrl-C stops).")
            else:
                console.say(f"No browser could be started; open the address above yourself. "
                            f"Waiting up to {_duration(timeout)}. If that browser runs on "
                            "another machine, stop and run "
                            f"`mailproxy authorize --manual {account.address}` instead.")
            try:
                async with asyncio.timeout(timeout):
                    code = await loopback.result
            except TimeoutError:
                raise FlowError(
                    f"{account.address}: no answer from the browser within "
                    f"{_duration(timeout)}. If the browser cannot reach this machine, run "
                    f"`mailproxy authorize --manual {account.address}`.") from None
        finally:
            await loopback.close()
    now = clock()
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "code_verifier": verifier, "client_id": account.client_id}
    form.update(client_auth_params(account, token_url, now=now))
    answer = await _token(http, account, token_url, form, "exchanging the authorization code")
    return _grant(account, answer, now, refresh=True)


def _manual_redirect_uri(configured: str | None) -> str:
    # Nothing listens there: the browser shows an error page whose address holds the code.
    if configured is None:
        return f"http://127.0.0.1:{_free_port('127.0.0.1')}/"
    parts = urlsplit(configured)
    if parts.port is None:
        return _with_port(configured, _free_port("127.0.0.1"))
    return configured


def _ask_for_code(account: Account, console: Console, url: str, state: str,
                  redirect_uri: str) -> str:
    host = urlsplit(redirect_uri).hostname
    console.say(
        f"To authorize {account.address}, open this address in a browser on any machine and "
        f"sign in:\n\n  {url}\n\n"
        f"Afterwards the browser goes to a {host} address and shows an error such as "
        "'This site can't be reached'. That is expected: copy the whole address from the "
        "address bar (or just the value after code=) and paste it here.")
    # ask() is called directly, not in a thread: a thread blocked on stdin would keep Ctrl-C
    # from ending the program until Enter is pressed.
    for _ in range(PASTE_ATTEMPTS):
        try:
            text = console.ask("Address or code: ")
        except EOFError:
            raise FlowError(f"{account.address}: no address was pasted (end of input); run "
                            f"`mailproxy authorize --manual {account.address}` in a "
                            "terminal.") from None
        found = parse_pasted(text)
        if found is None:
            console.say("That is neither the redirect address nor a code; paste the whole "
                        "address from the browser's address bar.")
            continue
        if found.state is not None and found.state != state:
            console.say("That address belongs to another sign-in attempt (its state does not "
                        "match); sign in with the address printed above and paste the result.")
            continue
        if found.error is not None:
            raise _provider_error(account, found)
        assert found.code is not None
        return found.code
    raise FlowError(f"{account.address}: no usable address after {PASTE_ATTEMPTS} tries; run "
                    f"`mailproxy authorize --manual {account.address}` again.")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 60}:{seconds % 60:02d} min"


_PAGE = ("<!doctype html><html><head><meta charset='utf-8'><title>mailproxy</title></head>"
         "<body style='font-family:sans-serif;margin:3em'><h1>{title}</h1><p>{text}</p>"
         "</body></html>")


class _Loopback:
    """The one-shot HTTP listener on 127.0.0.1 that the provider redirects the browser to."""

    def __init__(self, account: Account, state: str, redirect_uri: str) -> None:
        self.account = account
        self.state = state
        self.redirect_uri = redirect_uri
        self.path = urlsplit(redirect_uri).path or "/"
        self.result: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.servers: list[asyncio.Server] = []
        self.writers: set[asyncio.StreamWriter] = set()

    @classmethod
    async def start(cls, account: Account, state: str) -> _Loopback:
        configured = account.redirect_uri or "http://127.0.0.1/"
        parts = urlsplit(configured)
        host = parts.hostname or "127.0.0.1"
        # localhost may resolve to ::1 in the browser: listen there too when we can.
        hosts = ["127.0.0.1", "::1"] if host == "localhost" else [host]
        port = parts.port or 0
        self = cls(account, state, configured)
        try:
            for i, bind in enumerate(hosts):
                try:
                    server = await asyncio.start_server(self._serve, bind, port)
                except OSError as exc:
                    if i == 0:
                        raise FlowError(
                            f"{account.address}: cannot listen on {bind}:{port} for the "
                            f"sign-in redirect ({exc.strerror}); free the port or change "
                            "redirect_uri.") from None
                    continue  # no IPv6 loopback here
                self.servers.append(server)
                port = server.sockets[0].getsockname()[1]
        except BaseException:
            await self.close()
            raise
        self.redirect_uri = _with_port(configured, port)
        return self

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for writer in list(self.writers):
            writer.close()  # idle keep-alive or preconnect connections of the browser
        for server in self.servers:
            await server.wait_closed()
        if not self.result.done():
            self.result.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            async with asyncio.timeout(LOOPBACK_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, title, text = self._answer(head.split(b"\r\n", 1)[0].decode("latin-1"))
            body = _PAGE.format(title=html.escape(title), text=html.escape(text)).encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                "Referrer-Policy: no-referrer\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def _answer(self, request_line: str) -> tuple[str, str, str]:
        method, _, rest = request_line.partition(" ")
        target = rest.rsplit(" ", 1)[0]
        if method != "GET":
            return "405 Method Not Allowed", "Not here", "This address only takes GET."
        parts = urlsplit(target)
        if parts.path != self.path:
            return "404 Not Found", "Not found", "This is mailproxy's sign-in listener."
        if self.result.done():
            return ("200 OK", "Already done",
                    "The sign-in has finished; you can close this window.")
        found = parse_redirect_query(parts.query)
        if found.state != self.state:
            # Not from the sign-in we started (an old tab, or a forged request): ignore it.
            return ("400 Bad Request", "Not this sign-in",
                    "This answer does not belong to the sign-in mailproxy is waiting for. "
                    "Use the address mailproxy printed last.")
        if found.error is not None:
            self.result.set_exception(_provider_error(self.account, found))
            return ("200 OK", "Sign-in not completed",
                    f"The provider answered {found.error}. Go back to the terminal.")
        if found.code is None:
            return ("400 Bad Request", "No code",
                    "This answer holds no authorization code. Go back to the terminal.")
        self.result.set_result(found.code)
        return ("200 OK", "Signed in",
                f"mailproxy received the authorization for {self.account.address}. "
                "You can close this window.")


# ------------------------------------------------------------------------------ device code


def _number(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return default
    try:
        number = float(value)
    except ValueError:
        return default
    return number if number > 0 and number != float("inf") else default


async def _device_code(
    account: Account,
    console: Console,
    http: httpx.AsyncClient,
    token_url: str,
    *,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
) -> Grant:
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
    answer = await _token(http, account, url, form, "the device authorization request")
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
            token = await _post(http, token_url, request)
        except _Unreachable as exc:
            if not unreachable_said:  # a blip must not end a 15-minute wait
                console.say(f"The token endpoint is not answering ({exc}); still trying.")
                unreachable_said = True
            continue
        except _Refused as refused:
            if refused.error == "authorization_pending":
                continue
            if refused.error == "slow_down":
                interval += SLOW_DOWN_STEP
                continue
            if refused.error in ("access_denied", "authorization_declined"):
                raise FlowError(f"{account.address}: the sign-in with code {user_code} was "
                                "declined. Run `mailproxy authorize "
                                f"{account.address}` again and accept the requested "
                                "access.") from None
            if refused.error in ("expired_token", "code_expired"):
                raise FlowError(f"{account.address}: the code {user_code} expired before the "
                                f"sign-in finished; run `mailproxy authorize "
                                f"{account.address}` again.") from None
            raise _refusal(account, "the device code token request", refused) from None
        except FlowError as exc:
            raise FlowError(f"{account.address}: the device code token request failed: "
                            f"{exc}") from None
        return _grant(account, token, now, refresh=True)


def _clock_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"

