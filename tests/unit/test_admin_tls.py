"""The admin page over TLS (the listeners' reloadable certificate, Secure cookie, https links
and redirect URI, the Host names a certificate allows) and its TLS section, with a fake daemon
behind ``Backend``."""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.admin import hosts
from proxy.admin.app import make_app
from proxy.admin.model import TlsView
from proxy.admin.service import AdminService
from proxy.admin.web import COOKIE
from proxy.config import Settings, TlsSettings
from proxy.tls.contexts import ServerTls, following_context
from tests.support.tlsca import TestCA, make_test_ca
from tests.unit.test_admin_web import ADDRESS, CA, CA_PEM, CERT, FP, FakeBackend, Page, csrf_of


def der(pem_file: Path) -> bytes:
    cert = x509.load_pem_x509_certificate(pem_file.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def client_context(ca: TestCA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.ca_cert))


async def peer_certificate(port: int, ca: TestCA) -> bytes:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(ca),
                                              server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return bytes(der)


@pytest.fixture
async def tls_page(tmp_path: Path) -> AsyncIterator[tuple[Page, ServerTls, TestCA]]:
    """The page on 127.0.0.1 over TLS with a configured certificate (``[tls] cert_file``),
    through the daemon's ``ServerTls`` as the daemon wires it."""
    ca = make_test_ca(tmp_path / "ca")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(ca.server_cert, cert)
    shutil.copy(ca.server_key, key)
    settings = Settings(state_dir=tmp_path / "state", tls=TlsSettings(cert_file=cert,
                                                                      key_file=key))
    server_tls = ServerTls(settings, check_every=0.0)
    await server_tls.start()
    backend = FakeBackend()
    service = AdminService(backend, "127.0.0.1", 0, app_factory=make_app, clock=backend.clock,
                           ssl_context=following_context(lambda: server_tls.current("1.2"),
                                                             "1.2"))
    await service.start()
    task = asyncio.create_task(service.serve())
    try:
        async with httpx.AsyncClient(follow_redirects=False, verify=client_context(ca)) as http:
            yield Page(service, backend, http), server_tls, ca
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_over_tls_links_cookie_and_redirect_are_https(
        tls_page: tuple[Page, ServerTls, TestCA]) -> None:
    page, _, _ = tls_page
    port = page.service.port
    link = await page.service.link()
    assert link["url"].startswith(f"https://127.0.0.1:{port}/signin?token=")
    assert link["certificates"] == [f"ECDSA secp256r1 SHA-256 {FP}"]  # served only, not the CA
    assert link["local_ca"] is True
    answer = await page.http.get(link["url"])
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "; Secure" in cookie
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    csrf = csrf_of((await page.http.get(page.base + "/")).text)
    # The browser comes back to the name it used, over https (its cookie is for that name).
    for name in ("127.0.0.1", "localhost"):
        answer = await page.http.post(f"{page.base}/accounts/{ADDRESS}/signin",
                                      data={"csrf": csrf}, headers={"Host": f"{name}:{port}"})
        location = answer.headers["location"]
        assert f"redirect_uri=https://{name}:{port}/oauth/callback" in location, location
    state = re.search(r"state=([^&]+)", location)[1]  # type: ignore[index]
    done = await page.http.get(f"{page.base}/oauth/callback?state={state}&code=c1")
    assert "Sign-in finished" in done.text
    assert page.backend.codes[-1][2] == f"https://localhost:{port}/oauth/callback"
    # Names of the certificate are accepted as Host, others are not; an http Origin neither.
    for host, status in ((f"mailbox:{port}", 200), (f"pc7.office.example:{port}", 200),
                         (f"evil.test:{port}", 421), (f"mailbox:{port + 1}", 421)):
        assert (await page.http.get(page.base + "/", headers={"Host": host})).status_code \
            == status, host
    refused = await page.http.post(f"{page.base}/accounts/{ADDRESS}/passwords",
                                   data={"csrf": csrf, "label": "x"},
                                   headers={"Origin": f"http://127.0.0.1:{port}"})
    assert refused.status_code == 403


async def test_a_replaced_certificate_reaches_the_next_connection(
        tls_page: tuple[Page, ServerTls, TestCA], tmp_path: Path) -> None:
    page, server_tls, ca = tls_page
    assert await peer_certificate(page.service.port, ca) == der(ca.server_cert)
    other = make_test_ca(tmp_path / "other")  # e.g. ACME renewed it
    shutil.copy(other.server_key, tmp_path / "key.pem")
    shutil.copy(other.server_cert, tmp_path / "cert.pem")
    assert await server_tls.refresh()  # as the daemon's timer or a mail connection does
    assert await peer_certificate(page.service.port, other) == der(other.server_cert)


async def test_tls_section_shows_the_certificates_and_offers_the_ca(
        tls_page: tuple[Page, ServerTls, TestCA]) -> None:
    page, _, _ = tls_page
    download = f"{page.base}/tls/mailproxy-ca.pem"
    for url in (f"{page.base}/tls", download):
        answer = await page.http.get(url)
        assert answer.status_code == 401 and "BEGIN CERTIFICATE" not in answer.text
    await page.sign_in()
    shown = (await page.http.get(f"{page.base}/tls")).text
    assert '<a href="/tls" aria-current="page">TLS</a>' in shown
    served = shown[shown.index('data-role="served"'):shown.index('data-role="ca"')]
    assert f'data-sha256="{FP}"' in served
    assert f"{FP[:47]}<br>{FP[48:]}" in served  # two lines of 16 bytes
    assert "localhost, 127.0.0.1, ::1, mailbox, *.office.example" in served
    assert "(300 days left)" in served and "ECDSA secp256r1" in served
    ca = shown[shown.index('data-role="ca"'):]
    assert f'data-sha256="{CA.sha256}"' in ca and 'href="/tls/mailproxy-ca.pem"' in ca
    answer = await page.http.get(download)
    assert answer.status_code == 200 and answer.text == CA_PEM
    assert answer.headers["content-type"] == "application/x-x509-ca-cert"
    assert answer.headers["content-disposition"] == 'attachment; filename="mailproxy-ca.pem"'
    assert answer.headers["cache-control"] == "no-store"

    soon = replace(CERT, not_after=page.backend.now + 10 * 86400 + 60)
    gone = replace(CERT, role="chain", not_after=page.backend.now - 3 * 86400 - 60)
    page.backend.tls_ = TlsView(False, (soon, gone))  # [tls] cert_file: no CA of ours
    shown = (await page.http.get(f"{page.base}/tls")).text
    assert "the certificate of <code>[tls] cert_file</code>" in shown
    assert "badge warn" in shown and "10 days left" in shown
    assert "Chain certificate" in shown and "expired 4 days ago" in shown
    assert "There is no mailproxy CA to download" in shown and "mailproxy-ca.pem" not in shown
    answer = await page.http.get(download)
    assert answer.status_code == 404 and "no mailproxy CA to export" in answer.text
    page.backend.tls_ = TlsView(True, error="/state/tls/ca.pem does not exist yet")
    shown = (await page.http.get(f"{page.base}/tls")).text
    assert "Cannot show the certificates:</strong> /state/tls/ca.pem does not exist" in shown


def test_host_names_and_the_link_host() -> None:
    assert hosts.split_host("Mailbox.:8025", 443) == ("mailbox", 8025)
    assert hosts.split_host("[::1]:8025", 80) == ("::1", 8025)
    assert hosts.split_host("[::1]", 443) == ("::1", 443)
    assert hosts.split_host("mail.example.org", 443) == ("mail.example.org", 443)
    assert hosts.split_host("mailbox:x", 443) == ("mailbox", None)
    assert hosts.name_matches("pc7.office.example", "*.office.example")
    assert not hosts.name_matches("a.pc7.office.example", "*.office.example")
    assert not hosts.name_matches("office.example", "*.office.example")
    assert hosts.name_matches("::1", "0:0:0:0:0:0:0:1")
    names = frozenset({"localhost", "127.0.0.1", "::1", "mailbox", "192.0.2.7"})

    def allowed(value: str, listen: str, secure: bool) -> bool:
        return hosts.host_allowed(value, listen_host=listen, port=8025, secure=secure,
                                  names=names)

    # Plain http: loopback only, the certificate's names count for nothing.
    assert allowed("localhost:8025", "127.0.0.1", False)
    assert allowed("[::1]:8025", "127.0.0.1", False)
    assert not allowed("mailbox:8025", "127.0.0.1", False)
    assert not allowed("127.0.0.1:8025", "127.0.0.2", False)
    assert not allowed("127.0.0.1:8026", "127.0.0.1", False)
    # TLS on every address: the certificate's names, loopback too.
    for ok in ("mailbox:8025", "192.0.2.7:8025", "127.0.0.1:8025", "localhost:8025"):
        assert allowed(ok, "0.0.0.0", True), ok
    for bad in ("evil.test:8025", "0.0.0.0:8025", "mailbox", "mailbox:443"):
        assert not allowed(bad, "0.0.0.0", True), bad
    assert hosts.host_allowed("mail.example.org", listen_host="192.0.2.9", port=443,
                              secure=True, names={"mail.example.org"})
    assert allowed("192.0.2.9:8025", "192.0.2.9", True)  # the address it listens on
    # Links: the listen address, or for any address a name browsers can reach.
    assert hosts.link_host("192.0.2.9", ["localhost"]) == "192.0.2.9"
    assert hosts.link_host("0.0.0.0", ["localhost", "127.0.0.1", "::1", "*.x.example",
                                       "mailbox"]) == "mailbox"
    assert hosts.link_host("0.0.0.0", ["localhost"]) == "127.0.0.1"
    assert hosts.link_host("::", []) == "::1"
