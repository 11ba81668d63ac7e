"""The admin page's HTTP side with a fake daemon behind ``Backend``: who gets in (one-time
links, sessions, CSRF, Host), what a form does, the provider's callback."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from proxy.admin.app import make_app
from proxy.admin.model import (
    AccountView,
    AdminError,
    CertificateView,
    DeviceCodeView,
    PasswordNeed,
    PasswordView,
    QueuedView,
    SignedIn,
    TlsView,
)
from proxy.admin.service import AdminService
from proxy.admin.web import COOKIE

ADDRESS = "alice@example.test"


CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
FP = ":".join(f"{n:02X}" for n in range(32))
CERT = CertificateView("served", "/state/tls/server-ec.pem", "CN=mailbox", "CN=mailproxy CA",
                       ("localhost", "127.0.0.1", "::1", "mailbox", "*.office.example"),
                       900_000.0, 1_000_000.0 + 300 * 86400, "ECDSA secp256r1", FP)
CA = CertificateView("ca", "/state/tls/ca.pem", "CN=mailproxy CA", "CN=mailproxy CA", (),
                     900_000.0, 1_000_000.0 + 3000 * 86400, "ECDSA secp256r1", FP[::-1])


@dataclass
class FakeLock:
    backend: FakeBackend
    key: str

    def release(self) -> None:
        self.backend.held.discard(self.key)


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
    queue_: list[QueuedView] | None = None  # None: no queue in use
    retried: list[tuple[str | None, str | None]] = field(default_factory=list)
    held: set[str] = field(default_factory=set)  # accounts whose sign-in lock the page holds
    busy: str | None = None  # someone else holds every lock: this is why
    tls_: TlsView = field(default_factory=lambda: TlsView(True, (CERT, CA)))

    def clock(self) -> float:
        return self.now

    async def hold_sign_in(self, key: str) -> FakeLock:
        if self.busy is not None:
            raise AdminError(self.busy)
        if key in self.held:
            raise AdminError(f"a sign-in of {key} from this page is still under way")
        self.held.add(key)
        return FakeLock(self, key)

    async def tls(self) -> TlsView:
        return self.tls_

    async def local_ca(self) -> str:
        if not self.tls_.generated:
            raise AdminError("[tls] cert_file is set: there is no mailproxy CA to export")
        return CA_PEM

    async def accounts(self) -> list[AccountView]:
        return [AccountView(key=ADDRESS, address=ADDRESS, provider="custom",
                            flow="authorization_code", authorized=self.authorized,
                            reason=None if self.authorized else "not authorized yet",
                            vault="open" if self.authorized else "missing",
                            passwords=len(self.passwords_),
                            queued=len([m for m in self.queue_ or [] if m.account == ADDRESS]),
                            queue_oldest=min((m.received for m in self.queue_ or []),
                                             default=None),
                            queue_error=next((m.last_error for m in self.queue_ or []
                                              if m.last_error), None))]


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

    async def queue(self) -> list[QueuedView] | None:
        return None if self.queue_ is None else list(self.queue_)

    async def queue_retry(self, message_id: str | None, account: str | None) -> int:
        hits = [m for m in self.queue_ or [] if m.id == message_id or m.account == account]
        if message_id is not None and not hits:
            raise AdminError(f"no message {message_id!r} in the queue")
        self.retried.append((message_id, account))
        return len(hits)

    async def queue_delete(self, message_id: str) -> QueuedView:
        for m in self.queue_ or []:
            if m.id == message_id:
                assert self.queue_ is not None
                self.queue_.remove(m)
                return m
        raise AdminError(f"no message {message_id!r} in the queue")


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
        url = (await self.service.link())["url"]
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
    url = (await page.service.link())["url"]
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
    url = (await page.service.link())["url"]
    assert (await page.http.get(url)).status_code == 303
    page.http.cookies.clear()
    again = await page.http.get(url)
    assert again.status_code == 403 and "used already" in again.text
    assert (await page.http.get(page.base + "/")).status_code == 401


async def test_link_expires(page: Page) -> None:
    url = (await page.service.link())["url"]
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


def queued(id_: str, account: str = ADDRESS, **kw: object) -> QueuedView:
    fields: dict[str, object] = dict(
        id=id_, account=account, sender=account, recipients=("bob@example.test",), size=12_345,
        received=1_000_000.0 - 7200, attempts=3, next_attempt=1_000_000.0 + 300,
        last_error="421 4.4.2 upstream unreachable: connection refused", delivering=False,
        dsn=False)
    fields.update(kw)
    return QueuedView(**fields)  # type: ignore[arg-type]


async def test_queue_not_in_use_says_so(page: Page) -> None:
    await page.sign_in()
    shown = (await page.http.get(page.base + "/queue")).text
    assert "The outbound queue is not in use" in shown
    assert 'delivery = "queue"' in shown
    assert '<a href="/queue" aria-current="page">Queue</a>' in shown
    page.backend.queue_ = []
    shown = (await page.http.get(page.base + "/queue")).text
    assert "The queue is empty" in shown


async def test_queue_lists_messages_per_account_and_the_overview_counts_them(
        page: Page) -> None:
    await page.sign_in()
    page.backend.queue_ = [queued("m1"), queued("m2", attempts=0, last_error=None,
                                                 next_attempt=999_000.0, size=900),
                           queued("m3", account="gone@example.test", delivering=True,
                                  sender="")]
    shown = (await page.http.get(page.base + "/queue")).text
    assert "3 messages waiting" in shown
    mine = shown[shown.index(f'data-queue-account="{ADDRESS}"'):
                 shown.index('data-queue-account="gone@example.test"')]
    assert "2 messages" in mine and "Retry all 2 now" in mine
    m1 = mine[mine.index('data-message="m1"'):mine.index('data-message="m2"')]
    assert "2.0 h ago" in m1 and "12.3 kB" in m1 and "bob@example.test" in m1
    assert ">3<" in m1 and "in 5 min" in m1
    assert "421 4.4.2 upstream unreachable: connection refused" in m1
    m2 = mine[mine.index('data-message="m2"'):]
    assert "due now" in m2 and "not tried yet" in m2 and "900 B" in m2
    gone = shown[shown.index('data-queue-account="gone@example.test"'):]
    assert "Delivering now" in gone and "null sender" in gone
    assert "Retry all" not in gone  # one message: its own button does
    assert shown.count('name="csrf"') == 1 + 1 + 3  # sign out, retry all, a retry per message
    overview = (await page.http.get(page.base + "/rows")).text
    assert 'href="/queue#queue-alice@example.test">2 queued</a>' in overview
    assert "oldest 2.0 h ago" in overview and "last try failed" in overview
    assert 'title="421 4.4.2 upstream unreachable: connection refused"' in overview


async def test_queue_retry_one_and_all_of_an_account(page: Page) -> None:
    csrf = await page.sign_in()
    page.backend.queue_ = [queued("m1"), queued("m2")]
    url = page.base + "/queue/retry"
    assert (await page.http.post(url, data={"id": "m1"})).status_code == 403  # no CSRF token
    assert page.backend.retried == []
    answer = await page.http.post(url, data={"id": "m1", "csrf": csrf})
    assert answer.status_code == 303 and answer.headers["location"] == "/queue"
    assert "message m1 will be tried now" in (await page.http.get(page.base + "/queue")).text
    await page.http.post(url, data={"account": ADDRESS, "csrf": csrf})
    assert "2 messages of alice@example.test will be tried now" in (
        await page.http.get(page.base + "/queue")).text
    await page.http.post(url, data={"id": "nope", "csrf": csrf})
    shown = (await page.http.get(page.base + "/queue")).text
    assert "nothing was retried: no message &#39;nope&#39; in the queue" in shown
    assert page.backend.retried == [("m1", None), (None, ADDRESS)]
    assert "will be tried now" not in (await page.http.get(page.base + "/queue")).text


async def test_queue_delete_asks_first_then_deletes_with_the_token(page: Page) -> None:
    csrf = await page.sign_in()
    page.backend.queue_ = [queued("m1"), queued("m2")]
    confirm = await page.http.get(page.base + "/queue/m1/delete")
    assert confirm.status_code == 200 and "Delete this message?" in confirm.text
    assert "bob@example.test" in confirm.text and "gets no bounce" in confirm.text
    assert 'action="/queue/m1/delete"' in confirm.text and csrf_of(confirm.text) == csrf
    assert [m.id for m in page.backend.queue_] == ["m1", "m2"]  # looking deletes nothing
    url = page.base + "/queue/m1/delete"
    assert (await page.http.post(url, data={"csrf": "wrong"})).status_code == 403
    assert [m.id for m in page.backend.queue_] == ["m1", "m2"]
    answer = await page.http.post(url, data={"csrf": csrf})
    assert answer.status_code == 303 and answer.headers["location"] == "/queue"
    assert [m.id for m in page.backend.queue_] == ["m2"]
    shown = (await page.http.get(page.base + "/queue")).text
    assert "message m1 (alice@example.test → bob@example.test) deleted" in shown
    again = await page.http.get(page.base + "/queue/m1/delete")
    assert again.status_code == 404 and "no longer queued" in again.text
    await page.http.post(url, data={"csrf": csrf})
    assert "nothing was deleted" in (await page.http.get(page.base + "/queue")).text
    for path in ("/queue", "/queue/m2/delete"):
        page.http.cookies.clear()
        assert (await page.http.get(page.base + path)).status_code == 401


async def signin_state(page: Page, csrf: str) -> str:
    answer = await page.http.post(f"{page.base}/accounts/{ADDRESS}/signin", data={"csrf": csrf})
    assert answer.status_code == 303
    return re.search(r"state=([^&]+)", answer.headers["location"])[1]  # type: ignore[index]


async def test_a_browser_sign_in_holds_the_account_lock_until_it_ends(page: Page) -> None:
    csrf = await page.sign_in()
    first = await signin_state(page, csrf)
    assert page.backend.held == {ADDRESS}
    shown = (await page.http.get(f"{page.base}/accounts/{ADDRESS}")).text
    assert "a browser sign-in started just now waits for" in shown
    assert "<code>mailproxy authorize</code> cannot sign this account in" in shown
    assert f"It comes back to <code>{page.base}/oauth/callback</code>" in shown
    second = await signin_state(page, csrf)  # pressed again: the new one wins, one lock
    assert page.backend.held == {ADDRESS}
    async with httpx.AsyncClient() as browser:
        stale = await browser.get(f"{page.base}/oauth/callback?state={first}&code=c0")
        assert stale.status_code == 400
        assert page.backend.held == {ADDRESS}
        done = await browser.get(f"{page.base}/oauth/callback?state={second}&code=c1")
        assert "Sign-in finished" in done.text
    assert page.backend.held == set()
    # A provider's refusal ends it too, and so does a failed code exchange.
    state = await signin_state(page, csrf)
    await page.http.get(f"{page.base}/oauth/callback?state={state}&error=access_denied")
    assert page.backend.held == set()
    state = await signin_state(page, csrf)
    await page.http.get(f"{page.base}/oauth/callback?state={state}&code=bad")
    assert page.backend.held == set()
    assert "invalid_grant" in (await page.http.get(f"{page.base}/accounts/{ADDRESS}")).text


async def test_a_sign_in_nobody_finishes_lets_go_of_the_lock(page: Page) -> None:
    csrf = await page.sign_in()
    state = await signin_state(page, csrf)
    page.backend.now += 14 * 60
    page.service.sweep()
    assert page.backend.held == {ADDRESS}
    page.backend.now += 2 * 60
    page.service.sweep()  # the page's own task does this every few seconds
    assert page.backend.held == set()
    late = await page.http.get(f"{page.base}/oauth/callback?state={state}&code=c1")
    assert late.status_code == 400 and page.backend.codes == []
    # Or the person cancels it on the page.
    await signin_state(page, csrf)
    answer = await page.http.post(f"{page.base}/accounts/{ADDRESS}/signin/cancel",
                                  data={"csrf": csrf})
    assert answer.status_code == 303 and page.backend.held == set()
    shown = (await page.http.get(f"{page.base}/accounts/{ADDRESS}")).text
    assert "the sign-in was cancelled; nothing changed" in shown and "Waiting:" not in shown


async def test_a_lock_held_elsewhere_is_said_on_the_page(page: Page) -> None:
    csrf = await page.sign_in()
    page.backend.busy = (f"`mailproxy authorize {ADDRESS}` is running (pid 4242); finish or "
                         "stop it first, then try again here")
    answer = await page.http.post(f"{page.base}/accounts/{ADDRESS}/signin", data={"csrf": csrf})
    assert answer.headers["location"] == f"/accounts/{ADDRESS}"  # not to the provider
    shown = (await page.http.get(f"{page.base}/accounts/{ADDRESS}")).text
    assert "Failed:" in shown and "`mailproxy authorize alice@example.test` is running " \
        "(pid 4242)" in shown
    assert page.service.code_signins == {}


async def test_a_device_sign_in_holds_the_lock_and_can_be_cancelled(page: Page) -> None:
    csrf = await page.sign_in()
    original = page.backend.accounts

    async def device_accounts() -> list[AccountView]:
        from dataclasses import replace
        return [replace(a, flow="device_code") for a in await original()]

    page.backend.accounts = device_accounts  # type: ignore[method-assign]
    url = f"{page.base}/accounts/{ADDRESS}/signin"
    await page.http.post(url, data={"csrf": csrf})
    await asyncio.sleep(0)
    assert page.backend.held == {ADDRESS}
    shown = (await page.http.get(f"{page.base}/accounts/{ADDRESS}/device")).text
    assert "Cancel this sign-in" in shown
    await page.http.post(url, data={"csrf": csrf})  # again: the first is stopped first
    assert page.backend.held == {ADDRESS}
    await page.http.post(url + "/cancel", data={"csrf": csrf})
    assert page.backend.held == set()
    answer = await page.http.get(f"{page.base}/accounts/{ADDRESS}/device")
    assert answer.headers["location"] == f"/accounts/{ADDRESS}"
    await page.http.post(url, data={"csrf": csrf})
    await asyncio.sleep(0)
    page.backend.device_release.set()
    for _ in range(50):
        if not page.backend.held:
            break
        await asyncio.sleep(0.01)
    assert page.backend.held == set()
    assert "is authorized" in (await page.http.get(f"{page.base}/accounts/{ADDRESS}")).text
