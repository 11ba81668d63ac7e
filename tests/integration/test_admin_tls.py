"""The admin page over TLS against a real daemon: the listeners' certificate checked with
Python's ssl trusting `mailproxy tls export-ca`, a headless Chromium that accepts exactly that
certificate, the Secure cookie, the TLS section (fingerprints as `mailproxy tls info`, the CA
download as `tls export-ca`) and a browser sign-in back to https://.../oauth/callback. Also the
per-account sign-in lock between the page and `mailproxy authorize`, both ways."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.integration.conftest import _require
from tests.integration.test_admin_page import (
    NOTES_SCREENSHOT,
    account_keys,
    daemon,
    outcome_banner,
    screenshot,
    sign_in_link,
    wait_for,
)
from tests.support.browser import browser_available, start_chromium
from tests.support.clirun import ROOT, mailproxy, write_config
from tests.support.dovecot import Dovecot
from tests.support.servers import free_port
from tests.support.tokenserver import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TokenServer


@dataclass(frozen=True)
class TlsDaemon:
    config: Path
    base: str  # https://127.0.0.1:PORT
    port: int
    pid: int
    browser_user: str  # authorization_code
    device_user: str  # device_code
    trust: Path  # `mailproxy tls export-ca`
    ca_pem: str


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer,
               dovecot: Dovecot) -> Iterator[TlsDaemon]:
    """One daemon for this module (a start makes the local CA and its keys): [admin] tls = true
    on 127.0.0.1, an authorization-code account and a device-code one."""
    tmp = tmp_path_factory.mktemp("admin-tls")
    port = free_port()
    browser_user = f"u{secrets.token_hex(6)}@example.test"
    device_user = f"d{secrets.token_hex(6)}@example.test"
    config = write_config(
        tmp, token_server, dovecot, browser_user, admin=f"127.0.0.1:{port}",
        account=account_keys(token_server, "authorization_code")
        + f'\n[[accounts]]\naddress = "{device_user}"\nprovider = "custom"\n'
          f'client_id = "{TEST_CLIENT_ID}"\nclient_secret = "{TEST_CLIENT_SECRET}"\n'
          f'token_url = "{token_server.token_url}"\n'
          f'scopes = []\nimap_server = "{dovecot.host}:{dovecot.imaps_port}"\n'
        + account_keys(token_server, "device_code"))
    config.write_text(config.read_text() + "tls = true\n")  # in [admin], the last table
    with daemon(config, port, tmp / "daemon.log", scheme="https") as proc:
        ca_pem = mailproxy("tls", "export-ca", "--config", str(config))
        assert ca_pem.returncode == 0, ca_pem.stderr
        trust = tmp / "mailproxy-ca.pem"
        trust.write_text(ca_pem.stdout)
        yield TlsDaemon(config, f"https://127.0.0.1:{port}", port, proc.pid, browser_user,
                        device_user, trust, ca_pem.stdout)


def tls_info_fingerprints(config: Path) -> dict[str, list[str]]:
    """`mailproxy tls info`'s SHA-256 lines: {"served": [...], "ca": [...]}."""
    done = mailproxy("tls", "info", "--config", str(config))
    assert done.returncode == 0, done.stderr
    out: dict[str, list[str]] = {"served": [], "ca": []}
    role = ""
    for line in done.stdout.splitlines():
        if line.startswith("certificate"):
            role = "served"
        elif line.startswith("local CA"):
            role = "ca"
        elif line.strip().startswith("SHA-256:"):
            out[role].append(line.split()[-1])
    assert len(out["served"]) == 2 and len(out["ca"]) == 1, done.stdout  # ECDSA, RSA; the CA
    return out


def served_by(port: int, trust: Path) -> bytes:
    """The certificate (DER) the admin port serves to a client that trusts only ``trust``
    and checks the name 127.0.0.1 (a failed check raises)."""
    context = ssl.create_default_context(cafile=str(trust))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def colon_sha256(der: bytes) -> str:
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def spki_hash(pem_file: Path) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list takes for a certificate."""
    cert = x509.load_pem_x509_certificate(pem_file.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def test_admin_page_over_tls_in_a_browser(tls_daemon: TlsDaemon, token_server: TokenServer,
                                          tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    _require(*browser_available())
    d, base, user = tls_daemon, tls_daemon.base, tls_daemon.browser_user
    authority = token_server.authority
    authority.consent_user = user
    authority.https_redirects = {f"{base}/oauth/callback"}  # registered with the "provider"
    info = tls_info_fingerprints(d.config)
    # The page serves the listeners' certificate: valid for 127.0.0.1 under the local CA.
    assert colon_sha256(served_by(d.port, d.trust)) in info["served"]

    done = mailproxy("admin", "--config", str(d.config), "--no-browser")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    link = lines[-1]
    assert link.startswith(f"{base}/signin?token="), done.stdout
    assert [line.split()[-1] for line in lines if "SHA-256" in line] == info["served"]
    assert "mailproxy tls export-ca" in done.stdout

    tls_dir = d.config.parent / "state" / "tls"
    accepted = ",".join(spki_hash(tls_dir / f"server-{kind}.pem") for kind in ("ec", "rsa"))
    page: Any = start_chromium(flags=(f"--ignore-certificate-errors-spki-list={accepted}",))
    try:
        page.get(link)
        assert page.find_element(By.CSS_SELECTOR, f'tr[data-account="{user}"]')
        cookie = page.get_cookie("mailproxy_admin")
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        jar = {"mailproxy_admin": cookie["value"]}

        page.find_element(By.LINK_TEXT, "TLS").click()
        wait_for(lambda: page.current_url == f"{base}/tls")
        shown = {role: [e.get_attribute("data-sha256") for e in page.find_elements(
            By.CSS_SELECTOR, f'section[data-role="{role}"] code.fingerprint')]
            for role in ("served", "ca")}
        assert shown == info
        assert "Download the CA certificate" in page.find_element(By.ID, "ca").text
        screenshot(page, tmp_path / "tls.png")
        if NOTES_SCREENSHOT.parent.is_dir() and os.access(NOTES_SCREENSHOT.parent, os.W_OK):
            shutil.copy(tmp_path / "tls.png", NOTES_SCREENSHOT.parent / "admin_tls.png")

        # The download is the CA `tls export-ca` prints, for signed-in users only.
        verify = ssl.create_default_context(cafile=str(d.trust))
        with httpx.Client(verify=verify, cookies=jar) as http:
            answer = http.get(f"{base}/tls/mailproxy-ca.pem")
        assert answer.status_code == 200 and answer.text == d.ca_pem
        assert answer.headers["content-type"] == "application/x-x509-ca-cert"
        assert answer.headers["content-disposition"] == 'attachment; filename="mailproxy-ca.pem"'
        refused = httpx.get(f"{base}/tls/mailproxy-ca.pem", verify=verify)
        assert refused.status_code == 401 and "CERTIFICATE" not in refused.text

        # A browser sign-in: to the provider and back to https://.../oauth/callback.
        page.get(f"{base}/accounts/{user}")
        assert f"{base}/oauth/callback" in page.find_element(By.ID, "signin").text
        page.find_element(By.CSS_SELECTOR, "#signin button[type=submit]").click()
        banner = outcome_banner(page, f"{base}/accounts/{user}")
        assert "ok" in banner.get_attribute("class").split(), banner.text
        assert "is authorized" in banner.text
        assert authority.authorize_requests[-1]["redirect_uri"] == f"{base}/oauth/callback"
    finally:
        page.quit()


def test_one_sign_in_at_a_time_between_page_and_cli(tls_daemon: TlsDaemon,
                                                    token_server: TokenServer) -> None:
    d, user = tls_daemon, tls_daemon.device_user
    config = str(d.config)
    authority = token_server.authority
    authority.device_interval = 0.2
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPROXY_")}
    env["BROWSER"] = "true"  # the CLI opens no real browser
    verify = ssl.create_default_context(cafile=str(d.trust))
    with httpx.Client(verify=verify, follow_redirects=True) as http:
        assert http.get(sign_in_link(d.config)).status_code == 200  # on to the accounts
        account = f"{d.base}/accounts/{user}"
        csrf = re.search(r'name="csrf" value="([^"]+)"', http.get(account).text)[1]  # type: ignore[index]

        before = set(authority.pending_user_codes())

        def new_code(*seen: str) -> str:
            """A code handed out after this test began (a code of another, left pending,
            would be taken for this one's at once)."""
            return wait_for(lambda: [c for c in authority.pending_user_codes()
                                     if c not in before and c not in seen], 20)[0]

        # The page holds it: authorize says so.
        http.post(account + "/signin", data={"csrf": csrf, "password": "page pw"})
        page_code = new_code()
        cli = mailproxy("authorize", user, "--config", config, env=env)
        assert cli.returncode == 1
        assert (f"the admin page (mailproxy daemon, pid {d.pid}) is signing {user} in right "
                "now; finish or cancel it there first") in cli.stderr
        http.post(account + "/signin/cancel", data={"csrf": csrf})
        authority.deny_device(page_code)  # not pending for later tests

        # authorize holds it: the page says so.
        waiting = subprocess.Popen(
            [sys.executable, "-m", "proxy", "authorize", user, "--config", config], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env)
        try:
            cli_code = new_code(page_code)
            answer = http.post(account + "/signin", data={"csrf": csrf, "password": "x"},
                               follow_redirects=False)
            assert answer.headers["location"] == f"/accounts/{user}"
            shown = http.get(account).text
            assert (f"`mailproxy authorize {user}` is running (pid {waiting.pid}); finish or "
                    "stop it first, then try again here") in shown
            time.sleep(0.3)
            authority.approve_device(cli_code, user)
            out, err = waiting.communicate("cli pw\n", timeout=60)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
        assert waiting.returncode == 0, err
        assert f"{user} is authorized" in out
        # Free again: the page can start a sign-in now.
        answer = http.post(account + "/signin", data={"csrf": csrf, "password": "cli pw"},
                           follow_redirects=False)
        assert answer.headers["location"] == f"/accounts/{user}/device"
        last = new_code(page_code, cli_code)
        http.post(account + "/signin/cancel", data={"csrf": csrf})
        authority.deny_device(last)
    assert not {page_code, cli_code, last} & set(authority.pending_user_codes())
