"""The authorization code flow with PKCE: the sign-in address, then the code from the one-shot
loopback listener the browser is redirected to, or from the address the person pastes."""

from __future__ import annotations

import asyncio
import html
import re
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
from authlib.oauth2.rfc6749.parameters import (  # type: ignore[import-untyped]
    prepare_grant_uri,
)
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]

from ...config import Account
from ...providers import PRESETS
from ..errors import FlowError
from ..grants import client_auth_params
from .exchange import Console, Grant, clean, grant_from, token_request

# A browser (or a port scanner) that opens a connection to the loopback listener and sends
# nothing must not hold it open.
LOOPBACK_READ_TIMEOUT = 10.0
PASTE_ATTEMPTS = 3

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
    description = clean(redirect.error_description, {})
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


async def authorization_code_flow(
    account: Account,
    console: Console,
    http: httpx.AsyncClient,
    token_url: str,
    *,
    manual: bool,
    timeout: float,
    clock: Callable[[], float],
) -> Grant:
    """Sign in in a browser and exchange the code it brings back for a grant."""
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
    return await redeem_code(account, http, token_url, code, redirect_uri, verifier, clock())


async def redeem_code(account: Account, http: httpx.AsyncClient, token_url: str, code: str,
                      redirect_uri: str, verifier: str, now: float) -> Grant:
    """Exchange an authorization code for a grant (PKCE verifier, the same redirect_uri);
    also for a redirect another listener received (the admin page's ``/oauth/callback``)."""
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "code_verifier": verifier, "client_id": account.client_id}
    form.update(client_auth_params(account, token_url, now=now))
    answer = await token_request(http, account, token_url, form,
                                 "exchanging the authorization code")
    return grant_from(account, answer, now, refresh=True)


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
