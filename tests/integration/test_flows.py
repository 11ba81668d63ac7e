"""Every authorization flow end to end against the real test token server.

The browser is another thread making real HTTP requests: it opens the authorize URL, follows
the 302 to the flow's loopback listener (which runs on the test's event loop) and reads the page.
The tokens obtained are then checked the way Dovecot and the token manager use them:
introspection says active for the right user, and the refresh token refreshes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from proxy.config import Account
from proxy.tokens.flows import FlowError, Grant, app_token_form, authorize, client_auth_params
from tests.support.servers import free_port
from tests.support.tokenserver import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TokenServer

PUBLIC_CLIENT = "mailproxy-public-client"
CERT_CLIENT = "mailproxy-cert-client"


# ------------------------------------------------------------------------------ helpers


class Browser:
    """The person's browser: visits URLs from its own thread, following redirects."""

    def __init__(self, first: Callable[[str], str | None] | None = None) -> None:
        self.first = first  # a URL to visit before the real one (given the authorize URL)
        self.pages: list[httpx.Response] = []
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def __call__(self, url: str) -> bool:
        thread = threading.Thread(target=self._visit, args=(url,), daemon=True)
        self._threads.append(thread)
        thread.start()
        return True

    def _visit(self, url: str) -> None:
        try:
            with httpx.Client(follow_redirects=True, timeout=5) as client:
                if self.first is not None:
                    extra = self.first(url)
                    if extra is not None:
                        self.pages.append(client.get(extra))
                self.pages.append(client.get(url))
        except BaseException as exc:
            self.errors.append(exc)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=5)
        assert not self.errors, self.errors


class FakeConsole:
    def __init__(
        self,
        browser: Callable[[str], bool] | None = None,
        answers: list[str | Callable[[FakeConsole], str]] | None = None,
    ) -> None:
        self.browser = browser
        self.answers: deque[str | Callable[[FakeConsole], str]] = deque(answers or [])
        self.said: list[str] = []
        self.asked: list[str] = []
        self.opened: list[str] = []

    def say(self, text: str) -> None:
        self.said.append(text)

    def ask(self, prompt: str) -> str:
        self.asked.append(prompt)
        if not self.answers:
            raise EOFError
        answer = self.answers.popleft()
        return answer if isinstance(answer, str) else answer(self)

    def open_browser(self, url: str) -> bool:
        self.opened.append(url)
        return self.browser(url) if self.browser is not None else False

    def printed_url(self) -> str:
        for text in self.said:
            for word in text.split():
                if "/authorize?" in word:
                    return word
        raise AssertionError(f"no authorize URL said: {self.said}")


async def run(account: Account, console: FakeConsole, **kwargs: Any) -> Grant:
    """authorize(), bounded: a regression (say, polling forever) fails instead of hanging."""
    async with asyncio.timeout(10):
        return await authorize(account, console, **kwargs)


def make_account(ts: TokenServer, address: str, **overrides: Any) -> Account:
    data: dict[str, Any] = {
        "address": address,
        "provider": "custom",
        "client_id": TEST_CLIENT_ID,
        "client_secret": TEST_CLIENT_SECRET,
        "token_url": ts.token_url,
        "authorize_url": ts.authorize_url,
        "device_authorization_url": ts.device_authorization_url,
        "imap_server": "127.0.0.1:1",
        "scopes": ["mail", "offline_access"],
    }
    data.update(overrides)
    return Account.model_validate({k: v for k, v in data.items() if v is not None})


def introspect(ts: TokenServer, token: str) -> dict[str, Any]:
    answer = httpx.post(ts.introspection_url, data={"token": token}, timeout=5)
    answer.raise_for_status()
    result: dict[str, Any] = answer.json()
    return result


def refresh(ts: TokenServer, refresh_token: str, client: dict[str, str]) -> httpx.Response:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, **client}
    return httpx.post(ts.token_url, data=form, timeout=5)


def assert_works_for(ts: TokenServer, grant: Grant, user: str) -> None:
    assert grant.access_token
    info = introspect(ts, grant.access_token)
    assert info["active"] is True
    assert info["email"] == user


def no_redirect_location(url: str) -> str:
    """What the provider redirects the browser to, without going there (nothing listens)."""
    response = httpx.get(url, follow_redirects=False, timeout=5)
    assert response.status_code == 302, response.text
    return response.headers["location"]


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


class Credentials:
    """A throwaway RSA key and self-signed certificate."""

    def __init__(self, name: str) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.key_pem = self.key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())
        self.public_pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def creds() -> Credentials:
    return Credentials("mailproxy test client")


@pytest.fixture
def ts(token_server: TokenServer) -> Iterator[TokenServer]:
    token_server.authority.register_client(PUBLIC_CLIENT)
    yield token_server


# ------------------------------------------------------------------- authorization code


async def test_authorization_code_loopback(ts: TokenServer, mail_user: str) -> None:
    browser = Browser()
    console = FakeConsole(browser)
    account = make_account(ts, mail_user)

    grant = await run(account, console, timeout=5)
    browser.join()

    assert_works_for(ts, grant, mail_user)
    assert grant.refresh_token and grant.expires_at is not None
    assert "[hidden]" in repr(grant) and grant.access_token not in repr(grant)
    # The browser ended on the loopback listener's page.
    page = browser.pages[-1]
    assert page.status_code == 200 and "You can close this window" in page.text
    assert str(page.url).startswith("http://127.0.0.1:")
    sent = ts.authority.authorize_requests[-1]
    assert sent["code_challenge_method"] == "S256" and len(sent["code_challenge"]) == 43
    assert sent["login_hint"] == mail_user
    assert sent["scope"] == "mail offline_access"
    assert urlsplit(sent["redirect_uri"]).hostname == "127.0.0.1"
    assert console.opened == [console.printed_url()]
    assert ts.authority.requests_for("authorization_code")[-1][1] == mail_user

    answer = refresh(ts, grant.refresh_token,
                     {"client_id": TEST_CLIENT_ID, "client_secret": TEST_CLIENT_SECRET})
    assert answer.status_code == 200, answer.text
    assert introspect(ts, answer.json()["access_token"])["email"] == mail_user


async def test_loopback_ignores_a_foreign_state_then_accepts_ours(
    ts: TokenServer, mail_user: str
) -> None:
    def forged(authorize_url: str) -> str:
        redirect_uri = query_of(authorize_url)["redirect_uri"]
        return redirect_uri + "?" + urlencode({"code": "forged-code", "state": "not-ours"})

    browser = Browser(first=forged)
    grant = await run(make_account(ts, mail_user), FakeConsole(browser), timeout=5)
    browser.join()

    assert browser.pages[0].status_code == 400
    assert "does not belong" in browser.pages[0].text
    assert browser.pages[1].status_code == 200
    assert_works_for(ts, grant, mail_user)


async def test_access_denied_stops_with_the_providers_error(
    ts: TokenServer, mail_user: str
) -> None:
    ts.authority.deny_authorization = True
    browser = Browser()
    with pytest.raises(FlowError) as caught:
        await run(make_account(ts, mail_user), FakeConsole(browser), timeout=5)
    browser.join()

    text = str(caught.value)
    assert "access_denied" in text and "The user declined to grant access." in text
    assert f"mailproxy authorize {mail_user}" in text
    assert browser.pages[-1].status_code == 200
    assert "not completed" in browser.pages[-1].text
    assert ts.authority.requests_for("authorization_code") == []


async def test_no_browser_times_out_and_points_to_manual(ts: TokenServer, mail_user: str) -> None:
    console = FakeConsole(browser=None)
    with pytest.raises(FlowError, match="--manual"):
        await run(make_account(ts, mail_user), console, timeout=0.3)
    assert any("No browser could be started" in s for s in console.said)


async def test_configured_redirect_uri_port_and_path(ts: TokenServer, mail_user: str) -> None:
    redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
    browser = Browser()
    grant = await run(make_account(ts, mail_user, redirect_uri=redirect_uri),
                            FakeConsole(browser), timeout=5)
    browser.join()
    assert ts.authority.authorize_requests[-1]["redirect_uri"] == redirect_uri
    assert str(browser.pages[-1].url).startswith(redirect_uri + "?")
    assert_works_for(ts, grant, mail_user)


async def test_localhost_redirect_without_port_gets_a_free_one(
    ts: TokenServer, mail_user: str
) -> None:
    browser = Browser()
    grant = await run(make_account(ts, mail_user, redirect_uri="http://localhost/cb"),
                            FakeConsole(browser), timeout=5)
    browser.join()
    sent = urlsplit(ts.authority.authorize_requests[-1]["redirect_uri"])
    assert sent.hostname == "localhost" and sent.port and sent.path == "/cb"
    assert_works_for(ts, grant, mail_user)


async def test_redirect_port_in_use_is_a_clear_error(ts: TokenServer, mail_user: str) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        account = make_account(ts, mail_user, redirect_uri=f"http://127.0.0.1:{port}/")
        with pytest.raises(FlowError, match=f"cannot listen on 127.0.0.1:{port}"):
            await run(account, FakeConsole(Browser()), timeout=5)
    finally:
        server.close()
        await server.wait_closed()


async def test_manual_paste_of_the_full_address(ts: TokenServer, mail_user: str) -> None:
    def paste(console: FakeConsole) -> str:
        return no_redirect_location(console.printed_url())

    console = FakeConsole(answers=[paste])
    grant = await run(make_account(ts, mail_user), console, manual=True)

    assert console.opened == []  # headless: no browser is started
    assert any("expected" in s and "address bar" in s for s in console.said)
    assert_works_for(ts, grant, mail_user)
    assert grant.refresh_token


async def test_manual_paste_retries_then_takes_the_bare_code(
    ts: TokenServer, mail_user: str
) -> None:
    def foreign(console: FakeConsole) -> str:
        return "http://127.0.0.1:9/?code=zzz&state=someone-elses"

    def bare_code(console: FakeConsole) -> str:
        return query_of(no_redirect_location(console.printed_url()))["code"]

    console = FakeConsole(answers=["what?  not a code", foreign, bare_code])
    grant = await run(make_account(ts, mail_user), console, manual=True)

    assert len(console.asked) == 3
    assert any("another sign-in attempt" in s for s in console.said)
    assert_works_for(ts, grant, mail_user)


async def test_manual_paste_of_a_denial(ts: TokenServer, mail_user: str) -> None:
    ts.authority.deny_authorization = True

    def paste(console: FakeConsole) -> str:
        return no_redirect_location(console.printed_url())

    with pytest.raises(FlowError, match="access_denied"):
        await run(make_account(ts, mail_user), FakeConsole(answers=[paste]), manual=True)


async def test_manual_without_input_is_a_clear_error(ts: TokenServer, mail_user: str) -> None:
    with pytest.raises(FlowError, match="no address was pasted"):
        await run(make_account(ts, mail_user), FakeConsole(answers=[]), manual=True)


async def test_gmail_preset_asks_for_offline_access(ts: TokenServer, mail_user: str) -> None:
    # Like Google: a refresh token only with access_type=offline (the scope has no
    # offline_access).
    ts.authority.authorization_refresh_tokens = "offline"
    account = make_account(ts, mail_user, provider="gmail", scopes=None,
                           device_authorization_url=None, imap_server=None)
    browser = Browser()
    grant = await run(account, FakeConsole(browser), timeout=5)
    browser.join()

    sent = ts.authority.authorize_requests[-1]
    assert sent["access_type"] == "offline" and sent["prompt"] == "consent"
    assert sent["scope"] == "https://mail.google.com/"
    assert sent["login_hint"] == mail_user
    assert grant.refresh_token
    assert_works_for(ts, grant, mail_user)


async def test_gmail_without_refresh_token_explains_offline_access(
    ts: TokenServer, mail_user: str
) -> None:
    ts.authority.authorization_refresh_tokens = "never"
    account = make_account(ts, mail_user, provider="gmail", scopes=None,
                           device_authorization_url=None, imap_server=None)
    browser = Browser()
    with pytest.raises(FlowError) as caught:
        await run(account, FakeConsole(browser), timeout=5)
    browser.join()
    text = str(caught.value)
    assert "no refresh token" in text and "access_type=offline" in text
    assert "myaccount.google.com/permissions" in text


async def test_without_offline_access_scope_there_is_no_refresh_token(
    ts: TokenServer, mail_user: str
) -> None:
    ts.authority.authorization_refresh_tokens = "offline"  # like Microsoft
    browser = Browser()
    with pytest.raises(FlowError, match="no refresh token"):
        await run(make_account(ts, mail_user, scopes=["mail"]), FakeConsole(browser),
                        timeout=5)
    browser.join()


def test_server_checks_pkce(ts: TokenServer, mail_user: str) -> None:
    """The flows' PKCE is only worth something if the server checks it: prove that it does."""
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"  # RFC 7636 appendix B
    challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    redirect_uri = "http://127.0.0.1:9/"

    def code() -> str:
        url = ts.authorize_url + "?" + urlencode({
            "client_id": TEST_CLIENT_ID, "response_type": "code", "redirect_uri": redirect_uri,
            "state": "s", "code_challenge": challenge, "code_challenge_method": "S256",
            "login_hint": mail_user})
        return query_of(no_redirect_location(url))["code"]

    def exchange(code: str, code_verifier: str | None) -> httpx.Response:
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "client_id": TEST_CLIENT_ID, "client_secret": TEST_CLIENT_SECRET}
        if code_verifier is not None:
            form["code_verifier"] = code_verifier
        return httpx.post(ts.token_url, data=form, timeout=5)

    wrong = exchange(code(), "x" * 43)
    assert wrong.status_code == 400 and "PKCE" in wrong.json()["error_description"]
    assert exchange(code(), None).json()["error"] == "invalid_grant"
    used = code()
    right = exchange(used, verifier)
    assert right.status_code == 200, right.text
    assert introspect(ts, right.json()["access_token"])["email"] == mail_user
    again = exchange(used, verifier)  # single use
    assert again.json()["error"] == "invalid_grant"
    # A plain (non-S256) challenge is refused at the authorization step.
    plain = ts.authorize_url + "?" + urlencode({
        "client_id": TEST_CLIENT_ID, "response_type": "code", "redirect_uri": redirect_uri,
        "state": "s", "code_challenge": verifier, "code_challenge_method": "plain"})
    assert query_of(no_redirect_location(plain))["error"] == "invalid_request"


# ------------------------------------------------------------------------------ device code


class Waits:
    """The flow's sleep: records what it was asked, sleeps at most `cap` for real, and runs
    `actions[i]` before the i-th wait (0-based)."""

    def __init__(self, cap: float, actions: dict[int, Callable[[], float | None]]) -> None:
        self.cap = cap
        self.actions = actions
        self.asked: list[float] = []

    async def __call__(self, seconds: float) -> None:
        index = len(self.asked)
        self.asked.append(seconds)
        real = min(seconds, self.cap)
        action = self.actions.get(index)
        if action is not None:
            override = action()
            if override is not None:
                real = override
        await asyncio.sleep(real)


def user_code_from(console: FakeConsole) -> str:
    return console.said[0].split("enter the code", 1)[1].split()[0]


async def test_device_flow_pending_slow_down_then_approved(
    ts: TokenServer, mail_user: str
) -> None:
    # 1 s: the two polls around wait 1 must come closer than that for the slow_down (two
    # requests on the loopback; 0.2 s was too short on a busy machine now and then).
    ts.authority.device_interval = 1.0
    ts.authority.device_slow_down_step = 0.1  # the server then wants 1.1 s between polls
    console = FakeConsole()

    def approve() -> None:
        ts.authority.approve_device(user_code_from(console), mail_user)

    # Wait 0: none for real (the server checks the spacing from the first poll on): pending.
    # Wait 1: none at all, as if the machine woke early: the server answers slow_down.
    # Wait 2: the person has signed in; 1.2 s for real, more than the server's 1.1 s.
    waits = Waits(cap=1.2, actions={0: lambda: 0.0, 1: lambda: 0.0, 2: approve})
    account = make_account(ts, mail_user, flow="device_code", client_id=PUBLIC_CLIENT,
                           client_secret=None)
    grant = await run(account, console, sleep=waits)

    outcomes = [outcome for _, outcome in ts.authority.device_polls]
    assert outcomes == ["authorization_pending", "slow_down", "ok"]
    assert waits.asked == pytest.approx([1.0, 1.0, 6.0])  # RFC 8628: 5 s more after slow_down
    said = console.said[0]
    assert ts.device_authorization_url.replace("/devicecode", "/device") in said
    assert "user_code=" in said  # verification_uri_complete
    assert "expires in 14:59" in said or "expires in 15:00" in said
    assert_works_for(ts, grant, mail_user)
    assert grant.refresh_token
    answer = refresh(ts, grant.refresh_token, {"client_id": PUBLIC_CLIENT})
    assert answer.status_code == 200, answer.text


async def test_device_flow_denied(ts: TokenServer, mail_user: str) -> None:
    ts.authority.device_interval = 0.1
    console = FakeConsole()
    waits = Waits(cap=0.15, actions={
        1: lambda: ts.authority.deny_device(user_code_from(console))})
    account = make_account(ts, mail_user, flow="device_code", client_id=PUBLIC_CLIENT,
                           client_secret=None)
    with pytest.raises(FlowError, match="declined"):
        await run(account, console, sleep=waits)
    assert [o for _, o in ts.authority.device_polls] == ["authorization_pending", "access_denied"]


async def test_device_flow_expired_at_the_server(ts: TokenServer, mail_user: str) -> None:
    ts.authority.device_interval = 0.1
    ts.authority.device_code_lifetime = 0.35
    frozen = 1_700_000_000.0  # the flow's own clock never reaches the expiry: the server's does
    account = make_account(ts, mail_user, flow="device_code", client_id=PUBLIC_CLIENT,
                           client_secret=None)
    with pytest.raises(FlowError, match="expired before the sign-in finished"):
        await run(account, FakeConsole(), sleep=Waits(cap=0.15, actions={}),
                        clock=lambda: frozen)
    assert ts.authority.device_polls[-1][1] == "expired_token"


async def test_device_flow_stops_when_the_code_expires(ts: TokenServer, mail_user: str) -> None:
    ts.authority.device_interval = 0.01
    now = [1_700_000_000.0]

    def jump() -> None:
        now[0] += 100.0  # each wait lasts 100 s on the flow's clock

    waits = Waits(cap=0.02, actions=dict.fromkeys(range(20), lambda: (jump(), None)[1]))
    console = FakeConsole()
    account = make_account(ts, mail_user, flow="device_code", client_id=PUBLIC_CLIENT,
                           client_secret=None)
    with pytest.raises(FlowError, match="expired"):
        await run(account, console, sleep=waits, clock=lambda: now[0])
    # 900 s: polls after 100 ... 800 s, then the flow stops by itself at 900 s.
    outcomes = [o for _, o in ts.authority.device_polls]
    assert outcomes == ["authorization_pending"] * 8
    reminders = [s for s in console.said if s.startswith("Still waiting")]
    assert len(reminders) == 8 and "expires in 13:20" in reminders[0]


async def test_gmail_has_no_device_flow(ts: TokenServer, mail_user: str) -> None:
    account = make_account(ts, mail_user, provider="gmail", flow="device_code",
                           device_authorization_url=None, scopes=None, imap_server=None)
    with pytest.raises(FlowError) as caught:
        await run(account, FakeConsole())
    text = str(caught.value)
    assert "Google does not allow the device flow" in text
    assert f"mailproxy authorize --manual {mail_user}" in text


# ------------------------------------------------------- client credentials, certificates


async def test_client_credentials_with_secret(ts: TokenServer, mail_user: str) -> None:
    ts.authority.register_client("cc-secret-client", "cc-secret-value", app_only_user=mail_user)
    account = make_account(ts, mail_user, flow="client_credentials",
                           client_id="cc-secret-client", client_secret="cc-secret-value")
    grant = await run(account, FakeConsole())
    assert grant.refresh_token is None and grant.expires_at is not None
    assert_works_for(ts, grant, mail_user)


async def test_client_credentials_wrong_secret_is_refused_without_echo(
    ts: TokenServer, mail_user: str
) -> None:
    ts.authority.register_client("cc-secret-client", "cc-secret-value", app_only_user=mail_user)
    account = make_account(ts, mail_user, flow="client_credentials",
                           client_id="cc-secret-client", client_secret="wrong-secret-value")
    with pytest.raises(FlowError) as caught:
        await run(account, FakeConsole())
    text = str(caught.value)
    assert "invalid_client" in text and "check client_id" in text
    assert "wrong-secret-value" not in text and "cc-secret-value" not in text


def write_pem(tmp_path: Path, name: str, *parts: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join(parts))
    return path


@pytest.mark.parametrize("same_file", [True, False])
async def test_client_credentials_with_certificate(
    ts: TokenServer, mail_user: str, creds: Credentials, tmp_path: Path, same_file: bool
) -> None:
    ts.authority.register_client(CERT_CLIENT, app_only_user=mail_user,
                                 certificate_pem=creds.cert_pem)
    if same_file:
        cert = write_pem(tmp_path, "client.pem", creds.cert_pem, creds.key_pem)
        key = None
    else:
        cert = write_pem(tmp_path, "client.crt", creds.cert_pem)
        key = write_pem(tmp_path, "client.key", creds.key_pem)
    account = make_account(ts, mail_user, flow="client_credentials", client_id=CERT_CLIENT,
                           client_secret=None, client_certificate=str(cert),
                           client_certificate_key=str(key) if key else None)
    grant = await run(account, FakeConsole())
    assert_works_for(ts, grant, mail_user)

    # The server refuses the same assertion twice (jti), and a fresh one works again.
    import time

    form = app_token_form(account, now=time.time())
    assert "client_secret" not in form
    first = httpx.post(ts.token_url, data=form, timeout=5)
    replay = httpx.post(ts.token_url, data=form, timeout=5)
    assert first.status_code == 200, first.text
    assert replay.status_code == 401 and "replayed" in replay.json()["error_description"]
    assert httpx.post(ts.token_url, data=app_token_form(account, now=time.time()),
                      timeout=5).status_code == 200


async def test_certificate_not_registered_is_refused(
    ts: TokenServer, mail_user: str, creds: Credentials, tmp_path: Path
) -> None:
    other = Credentials("another app")
    ts.authority.register_client(CERT_CLIENT, app_only_user=mail_user,
                                 certificate_pem=other.cert_pem)
    cert = write_pem(tmp_path, "client.pem", creds.cert_pem, creds.key_pem)
    account = make_account(ts, mail_user, flow="client_credentials", client_id=CERT_CLIENT,
                           client_secret=None, client_certificate=str(cert))
    with pytest.raises(FlowError, match=r"invalid_client.*thumbprint"):
        await run(account, FakeConsole())


async def test_authorization_code_with_certificate_then_refresh(
    ts: TokenServer, mail_user: str, creds: Credentials, tmp_path: Path
) -> None:
    ts.authority.register_client(CERT_CLIENT, certificate_pem=creds.cert_pem)
    cert = write_pem(tmp_path, "client.pem", creds.cert_pem, creds.key_pem)
    account = make_account(ts, mail_user, client_id=CERT_CLIENT, client_secret=None,
                           client_certificate=str(cert))
    browser = Browser()
    grant = await run(account, FakeConsole(browser), timeout=5)
    browser.join()
    assert_works_for(ts, grant, mail_user)
    assert grant.refresh_token

    import time

    auth = {"client_id": CERT_CLIENT, **client_auth_params(account, ts.token_url, now=time.time())}
    answer = refresh(ts, grant.refresh_token, auth)
    assert answer.status_code == 200, answer.text
    # Without client authentication the confidential client's refresh token is useless.
    assert refresh(ts, grant.refresh_token, {"client_id": CERT_CLIENT}).status_code == 401


# ------------------------------------------------------------------------ service account


def service_account_file(tmp_path: Path, creds: Credentials, email: str, ts: TokenServer) -> Path:
    path = tmp_path / "service-account.json"
    path.write_text(json.dumps({
        "type": "service_account",
        "project_id": "mailproxy-test",
        "private_key_id": "0123456789abcdef",
        "private_key": creds.key_pem.decode(),
        "client_email": email,
        "client_id": "1234567890",
        "token_uri": ts.token_url,
    }))
    return path


async def test_service_account_jwt_bearer(
    ts: TokenServer, mail_user: str, creds: Credentials, tmp_path: Path
) -> None:
    email = "mailproxy@mailproxy-test.iam.gserviceaccount.com"
    ts.authority.register_service_account(email, creds.public_pem)
    account = make_account(ts, mail_user, provider="gmail", flow="service_account",
                           client_id="", client_secret=None, scopes=None, imap_server=None,
                           device_authorization_url=None,
                           service_account_file=str(service_account_file(tmp_path, creds,
                                                                          email, ts)))
    grant = await run(account, FakeConsole())
    assert grant.refresh_token is None
    assert_works_for(ts, grant, mail_user)  # a token for the mailbox (sub), not the robot
    assert ts.authority.requests_for("urn:ietf:params:oauth:grant-type:jwt-bearer")[-1][1] == (
        mail_user)


async def test_service_account_unknown_to_the_server(
    ts: TokenServer, mail_user: str, tmp_path: Path
) -> None:
    creds = Credentials("unregistered")
    email = "stranger@mailproxy-test.iam.gserviceaccount.com"
    account = make_account(ts, mail_user, provider="gmail", flow="service_account",
                           client_id="", client_secret=None, scopes=None, imap_server=None,
                           device_authorization_url=None,
                           service_account_file=str(service_account_file(tmp_path, creds,
                                                                          email, ts)))
    with pytest.raises(FlowError, match="invalid_grant"):
        await run(account, FakeConsole())


# ------------------------------------------------------------------------- network errors


async def test_token_endpoint_down(ts: TokenServer, mail_user: str) -> None:
    ts.authority.register_client("cc-secret-client", "cc-secret-value", app_only_user=mail_user)
    account = make_account(ts, mail_user, flow="client_credentials",
                           client_id="cc-secret-client", client_secret="cc-secret-value")
    ts.stop_token_listener()
    with pytest.raises(FlowError, match="cannot reach") as caught:
        await run(account, FakeConsole(), request_timeout=2)
    assert "cc-secret-value" not in str(caught.value)


async def test_token_endpoint_5xx(ts: TokenServer, mail_user: str) -> None:
    ts.authority.register_client("cc-secret-client", "cc-secret-value", app_only_user=mail_user)
    account = make_account(ts, mail_user, flow="client_credentials",
                           client_id="cc-secret-client", client_secret="cc-secret-value")
    ts.authority.fail_next(503)
    with pytest.raises(FlowError, match=r"HTTP 503.*try again later"):
        await run(account, FakeConsole())
