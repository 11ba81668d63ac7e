"""The admin page in a real headless browser against a real daemon (`mailproxy run`), the test
token server and the test Dovecot: sign-in link, account list, authorization code and device
code sign-ins from the page, local passwords used over IMAP, and what is refused."""

from __future__ import annotations

import contextlib
import imaplib
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import _require
from tests.support.browser import browser_available, start_chromium
from tests.support.clirun import ROOT, listen_port, mailproxy, write_config
from tests.support.dovecot import Dovecot
from tests.support.servers import free_port
from tests.support.tokenserver import TokenServer

NOTES_SCREENSHOT = Path("/work/wt/_notes/admin.png")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _require(*browser_available())
    driver = start_chromium()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: Any) -> Any:
    browser.delete_all_cookies()
    return browser


def account_keys(token_server: TokenServer, flow: str) -> str:
    return (f'flow = "{flow}"\nauthorize_url = "{token_server.authorize_url}"\n'
            f'device_authorization_url = "{token_server.device_authorization_url}"')


@contextlib.contextmanager
def daemon(config: Path, admin_port: int, log: Path,
           scheme: str = "http") -> Iterator[subprocess.Popen[bytes]]:
    """`mailproxy run` in its own process until its admin page answers /livez (over https
    without checking the certificate: this only waits; the tests check it themselves)."""
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(config)],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        for _ in range(150):
            if proc.poll() is not None:
                raise AssertionError(f"mailproxy run exited: {log.read_text()}")
            try:
                answer = httpx.get(f"{scheme}://127.0.0.1:{admin_port}/livez", timeout=1,
                                   verify=False)
                if answer.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError(f"the admin page did not come up: {log.read_text()}")
        yield proc
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert proc.returncode == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def screenshot(page: Any, path: Path) -> None:
    """A test artifact; also copied to $TEST_ARTIFACTS_DIR when set (pytest's own
    temporary directories are pruned after a few runs)."""
    page.save_screenshot(str(path))
    keep = os.environ.get("TEST_ARTIFACTS_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)


def sign_in_link(config: Path) -> str:
    done = mailproxy("admin", "--config", str(config), "--no-browser")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


# How many pixels the accounts table is wider than the box it scrolls in.
_TABLE_OVERFLOW = ("const box = document.querySelector('.tablewrap');"
                   " return box.scrollWidth - box.clientWidth;")


def wait_for(condition: Any, timeout: float = 20.0) -> Any:
    """Poll until `condition()` is truthy. An element of the page being left (stale) or of the
    one not there yet (no such element) only means "not yet"."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(None, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)
                         ).until(lambda _: condition())


def outcome_banner(page: Any, url_tail: str) -> Any:
    """The account page's outcome banner (ok or bad) after a sign-in that ends on that page.
    The page was already at this URL before the form went off, and the callback page moves on
    by a meta refresh, so the URL alone says nothing: wait for the banner itself."""
    from selenium.webdriver.common.by import By

    def found() -> Any:
        if not page.current_url.endswith(url_tail):
            return None
        return page.find_elements(By.CSS_SELECTOR, ".banner.ok, .banner.bad")

    return wait_for(found)[0]


def click_fresh(find: Any) -> None:
    """Click the element ``find()`` returns, looking it up again when the page replaced it
    meanwhile (the account list redraws its rows every 5 s)."""
    wait_for(lambda: find().click() is None)


def imap_login(port: int, user: str, password: str) -> str:
    with imaplib.IMAP4("127.0.0.1", port, timeout=30) as imap:
        try:
            typ, _ = imap.login(user, password)
        except imaplib.IMAP4.error as exc:
            return f"NO {exc}"
        imap.logout()
        return str(typ)


def test_sign_in_from_the_page_then_imap_with_its_passwords(
        tmp_path: Path, token_server: TokenServer, dovecot: Dovecot, mail_user: str,
        page: Any) -> None:
    from selenium.webdriver.common.by import By

    port = free_port()
    other = f"x{mail_user}"
    config = write_config(
        tmp_path, token_server, dovecot, mail_user, admin=f"127.0.0.1:{port}",
        account=account_keys(token_server, "authorization_code")
        + f'\n[[accounts]]\naddress = "{other}"\nprovider = "custom"\nclient_id = "c"\n'
          f'token_url = "{token_server.token_url}"\nscopes = []\n'
          f'imap_server = "{dovecot.host}:{dovecot.imaps_port}"\n'
        + account_keys(token_server, "device_code"))
    imap_port = listen_port(config)
    token_server.authority.consent_user = mail_user
    with daemon(config, port, tmp_path / "daemon.log"):
        link = sign_in_link(config)
        assert link.startswith(f"http://127.0.0.1:{port}/signin?token=")
        page.get(link)
        row = page.find_element(By.CSS_SELECTOR, f'tr[data-account="{mail_user}"]')
        assert "Needs sign-in" in row.text and "not authorized yet" in row.text
        assert "None yet" in row.text  # no vault

        click_fresh(lambda: page.find_element(
            By.CSS_SELECTOR, f'tr[data-account="{mail_user}"]').find_element(
            By.LINK_TEXT, "Sign in…"))
        # The account page's form: the list has none, so this waits for the page to change.
        wait_for(lambda: page.find_elements(
            By.CSS_SELECTOR, "#signin button[type=submit]"))[0].click()
        # -> the token server's /authorize (approves at once) -> /oauth/callback -> the account
        banner = outcome_banner(page, f"/accounts/{mail_user}")
        assert "ok" in banner.get_attribute("class").split(), banner.text
        assert "Done:" in banner.text
        generated = page.find_element(By.CSS_SELECTOR, "code.secret").text
        assert len(generated) >= 20
        assert "✓ Authorized" in page.find_element(By.CSS_SELECTOR, "#signin").find_element(
            By.XPATH, "preceding-sibling::section[1]").text
        assert len(token_server.authority.requests_for("authorization_code")) == 1
        assert imap_login(imap_port, mail_user, generated) == "OK"

        page.refresh()  # shown once
        assert not page.find_elements(By.CSS_SELECTOR, "code.secret")

        page.find_element(By.ID, "label").send_keys("phone")
        page.find_element(By.XPATH, "//button[text()='Add password']").click()
        phone = wait_for(lambda: page.find_elements(By.CSS_SELECTOR, "code.secret"))[0].text
        assert phone != generated
        screenshot(page, tmp_path / "account.png")
        labels = [td.text for td in page.find_elements(
            By.CSS_SELECTOR, "table.passwords tbody td:first-child")]
        assert labels == ["default", "phone"]
        assert imap_login(imap_port, mail_user, phone) == "OK"
        page.find_element(By.CSS_SELECTOR, "button[aria-label='Remove password phone']").click()
        wait_for(lambda: "local password 'phone' removed" in page.find_element(
            By.CSS_SELECTOR, ".banner.ok").text)
        assert imap_login(imap_port, mail_user, phone).startswith("NO")
        assert imap_login(imap_port, mail_user, generated) == "OK"

        page.find_element(By.LINK_TEXT, "← All accounts").click()
        row = wait_for(lambda: page.find_elements(
            By.CSS_SELECTOR, f'tr[data-account="{mail_user}"]'))[0]
        cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
        assert cells[0].startswith("✓ Authorized") and cells[1] == "Open"
        # The access token's expiry: 60 min from the sign-in, shown rounded to the minute
        # ("59" once 30 s went by; a busy machine takes that long for the steps above).
        assert re.match(r"in (59|60) min\n", cells[2]), cells[2]
        assert re.match(r"(just now|\d+ s ago)\n", cells[3])
        assert cells[4].startswith("in ")  # refreshing from now on
        # On the 1440 px window the ten columns fit: no scroll bar under the table.
        assert page.execute_script(_TABLE_OVERFLOW) <= 0
        screenshot(page, tmp_path / "accounts.png")
        if NOTES_SCREENSHOT.parent.is_dir() and os.access(NOTES_SCREENSHOT.parent, os.W_OK):
            shutil.copy(tmp_path / "accounts.png", NOTES_SCREENSHOT)
        # On a 1024 px one the table scrolls, and the rows' actions stay in view at its edge.
        page.set_window_size(1024, 768)
        try:
            assert page.execute_script(_TABLE_OVERFLOW) > 0
            edge = page.find_element(By.CSS_SELECTOR, ".tablewrap").rect
            for action in page.find_elements(By.CSS_SELECTOR, "table.accounts td.actions a, "
                                                              "table.accounts td.actions button"):
                box = action.rect
                assert edge["x"] <= box["x"] and box["x"] + box["width"] <= edge["x"] + edge[
                    "width"], (box, edge)
            screenshot(page, tmp_path / "accounts-1024.png")
        finally:
            page.set_window_size(1440, 900)


def test_device_code_on_the_page_and_what_is_refused(
        tmp_path: Path, token_server: TokenServer, dovecot: Dovecot, mail_user: str,
        page: Any) -> None:
    from selenium.webdriver.common.by import By

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path, token_server, dovecot, mail_user, admin=f"127.0.0.1:{port}",
                          account=account_keys(token_server, "device_code"))
    authority = token_server.authority
    authority.device_interval = 0.5
    with daemon(config, port, tmp_path / "daemon.log"):
        link = sign_in_link(config)
        page.get(link)
        page.get(f"{base}/accounts/{mail_user}")
        page.find_element(By.ID, "pw").send_keys("device pw")
        page.find_element(By.CSS_SELECTOR, "#signin button[type=submit]").click()
        code = wait_for(lambda: page.find_elements(By.CSS_SELECTOR, "code.usercode"))[0].text
        assert code in authority.pending_user_codes()
        steps = page.find_element(By.CSS_SELECTOR, ".steps").text
        assert f"http://{token_server.host}:{token_server.token_port}/device" in steps
        counter = page.find_element(By.CSS_SELECTOR, "[data-countdown]")
        first = counter.text
        wait_for(lambda: counter.text != first, 5)  # counts down
        # The daemon polls while nobody has signed in: approve only after it was told to wait.
        wait_for(lambda: (code, "authorization_pending") in authority.device_polls, 10)
        screenshot(page, tmp_path / "device-waiting.png")
        authority.approve_device(code, mail_user)
        state = wait_for(lambda: page.find_elements(By.CSS_SELECTOR, ".device.state-approved"))
        screenshot(page, tmp_path / "device-approved.png")
        assert "✓ Approved" in state[0].text and f"{mail_user} is authorized" in state[0].text
        assert any(p[1] == "authorization_pending" for p in authority.device_polls)
        assert imap_login(listen_port(config), mail_user, "device pw") == "OK"

        cookie = page.get_cookie("mailproxy_admin")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        jar = {"mailproxy_admin": cookie["value"]}

        # Without the cookie nothing is readable; /livez is.
        for path in ("/", "/rows", f"/accounts/{mail_user}", f"/accounts/{mail_user}/device.json"):
            answer = httpx.get(base + path)
            assert answer.status_code == 401, path
            assert mail_user not in answer.text
        assert httpx.get(base + "/livez").text == "ok\n"
        # A used link (the one the browser opened) and a made-up one.
        assert httpx.get(link).status_code == 403
        assert httpx.get(f"{base}/signin?token=guess").status_code == 403
        # A form with a wrong CSRF token changes nothing.
        answer = httpx.post(f"{base}/accounts/{mail_user}/passwords", cookies=jar,
                            data={"csrf": "wrong", "label": "evil", "password": "evil pw"})
        assert answer.status_code == 403
        answer = httpx.post(f"{base}/accounts/{mail_user}/passwords", cookies=jar,
                            data={"label": "evil", "password": "evil pw"})
        assert answer.status_code == 403
        assert imap_login(listen_port(config), mail_user, "evil pw").startswith("NO")
        # With the session cookie the same page is readable.
        assert mail_user in httpx.get(base + "/rows", cookies=jar).text


def test_client_credentials_test_button(tmp_path: Path, token_server: TokenServer,
                                        dovecot: Dovecot, mail_user: str, page: Any) -> None:
    from selenium.webdriver.common.by import By

    port = free_port()
    app_user = f"app-{mail_user}"
    token_server.authority.register_client("cc-admin-client", "cc-admin-secret",
                                           app_only_user=app_user)
    config = write_config(
        tmp_path, token_server, dovecot, mail_user, admin=f"127.0.0.1:{port}",
        account=f'\n[[accounts]]\naddress = "{app_user}"\nprovider = "custom"\n'
                f'client_id = "cc-admin-client"\nclient_secret = "cc-admin-secret"\n'
                f'flow = "client_credentials"\ntoken_url = "{token_server.token_url}"\n'
                f'scopes = ["mail"]\nimap_server = "{dovecot.host}:{dovecot.imaps_port}"\n'
                f'imap_tls = "implicit"\nca_file = "{dovecot.ca_file}"\n')
    with daemon(config, port, tmp_path / "daemon.log"):
        page.get(sign_in_link(config))
        row = page.find_element(By.CSS_SELECTOR, f'tr[data-account="{app_user}"]')
        assert "client credentials" in row.text
        click_fresh(lambda: page.find_element(
            By.CSS_SELECTOR, f'tr[data-account="{app_user}"]').find_element(By.LINK_TEXT, "Test…"))
        wait_for(lambda: page.find_elements(By.ID, "pw"))[0].send_keys("app pw")  # its page
        page.find_element(By.CSS_SELECTOR, "#signin button[type=submit]").click()
        banner = wait_for(lambda: page.find_elements(By.CSS_SELECTOR, ".banner.ok"))[0]
        assert f"{app_user} is authorized; access token valid for" in banner.text
        assert not page.find_elements(By.CSS_SELECTOR, "code.secret")  # typed, not generated
        assert imap_login(listen_port(config), app_user, "app pw") == "OK"
        assert token_server.authority.requests_for("client_credentials")
        page.get(f"http://127.0.0.1:{port}/queue")  # no [smtp] delivery = "queue" here
        assert "The outbound queue is not in use" in page.find_element(By.TAG_NAME, "main").text


def smtp_port(config: Path) -> int:
    text = config.read_text()
    section = text[text.index("[smtp]"):]
    line = next(x for x in section.splitlines() if x.startswith("listen"))
    return int(line.rsplit(":", 1)[1].rstrip('"'))


def test_queue_view_retry_and_delete(tmp_path: Path, token_server: TokenServer,
                                     dovecot: Dovecot, mail_user: str, page: Any) -> None:
    """A message queued for an upstream that does not answer: listed with its last error,
    retried at once from the page, deleted after the confirmation page."""
    from selenium.webdriver.common.by import By

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    app_user = f"q-{mail_user}"
    token_server.authority.register_client("q-admin-client", "q-admin-secret",
                                           app_only_user=app_user)
    nobody = free_port()  # nothing listens there: every delivery attempt fails at connect
    config = write_config(
        tmp_path, token_server, dovecot, mail_user, admin=f"127.0.0.1:{port}",
        account=f'\n[[accounts]]\naddress = "{app_user}"\nprovider = "custom"\n'
                f'client_id = "q-admin-client"\nclient_secret = "q-admin-secret"\n'
                f'flow = "client_credentials"\ntoken_url = "{token_server.token_url}"\n'
                f'scopes = ["mail"]\nsmtp_server = "127.0.0.1:{nobody}"\n'
                f'smtp_tls = "implicit"\nca_file = "{dovecot.ca_file}"\n')
    config.write_text(config.read_text().replace("[smtp]\n", '[smtp]\ndelivery = "queue"\n'))

    def queue_row() -> Any:
        page.refresh()
        rows = page.find_elements(By.CSS_SELECTOR, "table.queue tbody tr")
        return rows[0] if rows else None

    def cells() -> list[str]:
        return [td.text for td in queue_row().find_elements(By.TAG_NAME, "td")]

    with daemon(config, port, tmp_path / "daemon.log"):
        page.get(sign_in_link(config))
        page.get(f"{base}/accounts/{app_user}")
        page.find_element(By.ID, "pw").send_keys("app pw")
        page.find_element(By.CSS_SELECTOR, "#signin button[type=submit]").click()
        wait_for(lambda: page.find_elements(By.CSS_SELECTOR, ".banner.ok"))
        page.get(f"{base}/queue")
        assert "The queue is empty" in page.find_element(By.TAG_NAME, "main").text

        with smtplib.SMTP("127.0.0.1", smtp_port(config), timeout=60) as s:
            s.login(app_user, "app pw")
            s.sendmail(app_user, ["bob@example.test", "carol@example.test"],
                       f"From: {app_user}\r\nTo: bob@example.test\r\nSubject: scan\r\n\r\n"
                       "page 1\r\n")
        wait_for(lambda: queue_row() is not None and cells()[3] == "1", 30)
        received, addresses, size, attempts, due, error, _ = cells()
        assert re.match(r"(just now|\d+ s ago)\n", received) and attempts == "1"
        assert app_user in addresses and "bob@example.test, carol@example.test" in addresses
        assert size.endswith(" B")
        assert due.startswith("in ")  # backing off
        assert error and "not tried yet" not in error
        section = page.find_element(By.CSS_SELECTOR, f'[data-queue-account="{app_user}"]')
        assert "1 message" in section.text
        screenshot(page, tmp_path / "queue.png")
        if NOTES_SCREENSHOT.parent.is_dir() and os.access(NOTES_SCREENSHOT.parent, os.W_OK):
            shutil.copy(tmp_path / "queue.png", NOTES_SCREENSHOT.parent / "admin_queue.png")

        page.get(base + "/")
        row = page.find_element(By.CSS_SELECTOR, f'tr[data-account="{app_user}"]')
        assert "1 queued" in row.text and "oldest" in row.text and "last try failed" in row.text
        action = row.find_element(By.CSS_SELECTOR, "td.actions a")  # not pushed off screen
        assert action.rect["x"] + action.rect["width"] <= page.execute_script(
            "return document.documentElement.clientWidth")
        screenshot(page, tmp_path / "accounts-queued.png")

        page.get(f"{base}/queue")
        page.find_element(By.XPATH, "//button[text()='Retry now']").click()
        assert "will be tried now" in wait_for(
            lambda: page.find_elements(By.CSS_SELECTOR, ".banner.ok"))[0].text
        # At once, not after the back-off of a minute: the worker was woken.
        wait_for(lambda: cells()[3] == "2", 15)

        page.find_element(By.LINK_TEXT, "Delete…").click()
        # The confirmation page (the queue page has an h1 too: wait for this one's).
        wait_for(lambda: "Delete this message?" in page.find_element(By.TAG_NAME, "h1").text)
        screenshot(page, tmp_path / "queue-delete.png")
        page.find_element(By.XPATH, "//button[text()='Delete the message']").click()
        banner = wait_for(lambda: page.find_elements(By.CSS_SELECTOR, ".banner.ok"))[0]
        assert "deleted without sending it" in banner.text
        assert "The queue is empty" in page.find_element(By.TAG_NAME, "main").text
        listed = mailproxy("queue", "list", "--json", "--config", str(config))
        assert listed.returncode == 0 and json.loads(listed.stdout) == []
