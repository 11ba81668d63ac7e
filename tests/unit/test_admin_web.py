"""The admin page's HTTP side with a fake daemon behind ``Backend``: who gets in (one-time
links, sessions, CSRF, Host), what a form does, the provider's callback."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from proxy.admin.model import (
    AccountView,
    AdminError,
    DeviceCodeView,
    PasswordNeed,
    PasswordView,
    SignedIn,
)
from proxy.admin.service import AdminService
from proxy.admin.web import COOKIE, make_app

ADDRESS = "alice@example.test"


@dataclass
class FakeBackend:
    now: float = 1_000_000.0
    version: str = "test"
    pid: int = 1
    started: float = 999_000.0
    authorized: bool = False
    passwords_: list[PasswordView] = field(default_factory=list)
    codes: list[tuple[str, str, str, str | None]] = field(default_factory=list)
    device_release: asyncio.Event = field(default_factory=asyncio.Event)

    def clock(self) -> float:
        return self.now

    async def accounts(self) -> list[AccountView]:
        return [AccountView(key=ADDRESS, address=ADDRESS, provider="custom",
                            flow="authorization_code", authorized=self.authorized,
                            reason=None if self.authorized else "not authorized yet",
                            vault="open" if self.authorized else "missing",
                            passwords=len(self.passwords_))]


    async def password_need(self, key: str) -> PasswordNeed:
        return "none" if self.authorized else "new"

    def authorization_url(self, key: str, redirect_uri: str, state: str,
                          code_verifier: str) -> str:
        return f"https://provider.test/authorize?state={state}&redirect_uri={redirect_uri}"

    async def sign_in_with_code(self, key: str, code: str, redirect_uri: str,
                                code_verifier: str, password: str | None) -> SignedIn:
        self.codes.append((key, code, redirect_uri, password))
        if code == "bad":
            raise AdminError("exchanging the authorization code was refused: invalid_grant")
        self.authorized = True
        self.passwords_.append(PasswordView("default", "password", self.now))
        return SignedIn(f"{key} is authorized")

    async def sign_in_with_device(self, key: str, show: Callable[[DeviceCodeView], None],
                                  password: str | None) -> SignedIn:
        show(DeviceCodeView("BCDF-GHJK", "https://provider.test/device", None, self.now + 600))
        await self.device_release.wait()
        return SignedIn(f"{key} is authorized")

    async def sign_in_app(self, key: str, password: str | None) -> SignedIn:
        raise AdminError("not this flow")

    async def passwords(self, key: str) -> list[PasswordView]:
        return list(self.passwords_)

    async def add_password(self, key: str, label: str, password: str) -> None:
        self.passwords_.append(PasswordView(label, "password", self.now))

    async def remove_password(self, key: str, label: str) -> None:
        self.passwords_ = [p for p in self.passwords_ if p.label != label]


@dataclass
class Page:
    service: AdminService
    backend: FakeBackend
    http: httpx.AsyncClient

    @property
    def base(self) -> str:
        return self.service.origin

    async def sign_in(self) -> str:
        """Redeem a fresh link; the CSRF token of the session."""
        url = self.service.link()["url"]
        answer = await self.http.get(url)
        assert answer.status_code == 303 and answer.headers["location"] == "/"
        return csrf_of((await self.http.get(self.base + "/")).text)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found[1]


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    backend = FakeBackend()
    service = AdminService(backend, "127.0.0.1", 0, app_factory=make_app, clock=backend.clock)
    await service.start()
    task = asyncio.create_task(service.serve())
    try:
        async with httpx.AsyncClient(follow_redirects=False) as http:
            yield Page(service, backend, http)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_nothing_readable_without_a_session(page: Page) -> None:
    for path in ("/", "/rows", f"/accounts/{ADDRESS}", "/nonexistent"):
        answer = await page.http.get(page.base + path)
        assert answer.status_code == 401, path
        assert ADDRESS not in answer.text
        assert "mailproxy admin" in answer.text
    answer = await page.http.get(page.base + "/livez")
    assert answer.status_code == 200 and answer.text == "ok\n"


async def test_link_gives_a_strict_httponly_session_cookie(page: Page) -> None:
    url = page.service.link()["url"]
    assert url.startswith(page.base + "/signin?token=")
    answer = await page.http.get(url)
    assert answer.status_code == 303
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http on loopback: the browser would drop it
    home = await page.http.get(page.base + "/")
    assert home.status_code == 200 and ADDRESS in home.text
    for name in ("content-security-policy", "x-frame-options", "referrer-policy"):
        assert name in home.headers
    assert "script-src 'self'" in home.headers["content-security-policy"]


async def test_link_works_once(page: Page) -> None:
    url = page.service.link()["url"]
    assert (await page.http.get(url)).status_code == 303
    page.http.cookies.clear()
    again = await page.http.get(url)
    assert again.status_code == 403 and "used already" in again.text
    assert (await page.http.get(page.base + "/")).status_code == 401


async def test_link_expires(page: Page) -> None:
    url = page.service.link()["url"]
    page.backend.now += page.service.gate.link_lifetime + 1
    assert (await page.http.get(url)).status_code == 403
    assert (await page.http.get(page.base + "/")).status_code == 401


async def test_session_expires_when_idle(page: Page) -> None:
    await page.sign_in()
    page.backend.now += 29 * 60
    assert (await page.http.get(page.base + "/")).status_code == 200
    page.backend.now += 31 * 60
    assert (await page.http.get(page.base + "/")).status_code == 401


async def test_forms_need_the_sessions_csrf_token(page: Page) -> None:
    csrf = await page.sign_in()
    url = f"{page.base}/accounts/{ADDRESS}/passwords"
    for data in ({"label": "x"}, {"label": "x", "csrf": "wrong"},
                 {"label": "x", "csrf": csrf[:-1]}):
        answer = await page.http.post(url, data=data)
        assert answer.status_code == 403
    answer = await page.http.post(url, data={"label": "x", "csrf": csrf},
                                  headers={"Origin": "http://evil.test"})
    assert answer.status_code == 403
    assert page.backend.passwords_ == []
    answer = await page.http.post(url, data={"label": "laptop", "csrf": csrf})
    assert answer.status_code == 303
    assert [p.label for p in page.backend.passwords_] == ["laptop"]
    shown = (await page.http.get(f"{page.base}/accounts/{ADDRESS}")).text
    assert "shown only this once" in shown
    again = (await page.http.get(f"{page.base}/accounts/{ADDRESS}")).text
    assert "shown only this once" not in again


async def test_another_host_name_is_refused(page: Page) -> None:
    await page.sign_in()
    host = f"evil.test:{page.service.port}"
    answer = await page.http.get(page.base + "/", headers={"Host": host})
    assert answer.status_code == 421


async def test_code_sign_in_and_its_callback(page: Page) -> None:
    csrf = await page.sign_in()
    answer = await page.http.post(f"{page.base}/accounts/{ADDRESS}/signin", data={"csrf": csrf})
    assert answer.status_code == 303
    location = answer.headers["location"]
    assert location.startswith("https://provider.test/authorize?state=")
    state = re.search(r"state=([^&]+)", location)[1]  # type: ignore[index]
    assert f"redirect_uri={page.base}/oauth/callback" in location

    cookieless = httpx.AsyncClient()
    async with cookieless:
        wrong = await cookieless.get(f"{page.base}/oauth/callback?state=other&code=c")
        assert wrong.status_code == 400
        done = await cookieless.get(f"{page.base}/oauth/callback?state={state}&code=c1")
        assert done.status_code == 200 and "Sign-in finished" in done.text
        assert f'url=/accounts/{ADDRESS}' in done.text
        replay = await cookieless.get(f"{page.base}/oauth/callback?state={state}&code=c1")
        assert replay.status_code == 400
    key, code, redirect_uri, password = page.backend.codes[0]
    assert (key, code, redirect_uri) == (ADDRESS, "c1", f"{page.base}/oauth/callback")
    assert password is not None and len(password) >= 20  # generated: no vault yet
    account = (await page.http.get(f"{page.base}/accounts/{ADDRESS}")).text
    assert password in account, account
    assert "badge ok" in account and "Authorized" in account


async def test_provider_error_in_the_callback(page: Page) -> None:
    csrf = await page.sign_in()
    answer = await page.http.post(f"{page.base}/accounts/{ADDRESS}/signin", data={"csrf": csrf})
    state = re.search(r"state=([^&]+)", answer.headers["location"])[1]  # type: ignore[index]
    done = await page.http.get(f"{page.base}/oauth/callback?state={state}&error=access_denied"
                               "&error_description=The+user+said+no")
    assert "Sign-in failed" in done.text
    account = (await page.http.get(f"{page.base}/accounts/{ADDRESS}")).text
    assert "access_denied (The user said no)" in account
    assert page.backend.codes == []


async def test_device_sign_in_state(page: Page) -> None:
    csrf = await page.sign_in()
    original = page.backend.accounts

    async def device_accounts() -> list[AccountView]:
        from dataclasses import replace
        return [replace(a, flow="device_code") for a in await original()]

    page.backend.accounts = device_accounts  # type: ignore[method-assign]
    answer = await page.http.post(f"{page.base}/accounts/{ADDRESS}/signin", data={"csrf": csrf})
    assert answer.headers["location"] == f"/accounts/{ADDRESS}/device"
    await asyncio.sleep(0)
    state = (await page.http.get(f"{page.base}/accounts/{ADDRESS}/device.json")).json()
    assert state["state"] == "waiting" and state["user_code"] == "BCDF-GHJK"
    assert state["expires_in"] == 600
    shown = (await page.http.get(f"{page.base}/accounts/{ADDRESS}/device")).text
    assert "BCDF-GHJK" in shown and 'data-countdown="600"' in shown
    page.backend.device_release.set()
    for _ in range(50):
        state = (await page.http.get(f"{page.base}/accounts/{ADDRESS}/device.json")).json()
        if state["state"] == "approved":
            break
        await asyncio.sleep(0.01)
    assert state == {"state": "approved", "message": f"{ADDRESS} is authorized",
                     "expires_in": 600, "user_code": "BCDF-GHJK"}
