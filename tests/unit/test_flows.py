"""Pure logic of the authorization flows: PKCE, URLs, pasted addresses, JWTs, error texts.

Token endpoints here are httpx.MockTransport scripts with a fake clock and sleep; the flows
against a real server are in tests/integration/test_flows.py.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from proxy.config import Account
from proxy.tokens.assertion import (
    CertificateCredential,
    client_assertion,
    load_service_account,
    service_account_assertion,
)
from proxy.tokens.flows import (
    CLIENT_ASSERTION_TYPE,
    DeviceCode,
    FlowError,
    Grant,
    Redirect,
    app_token_form,
    authorization_url,
    authorize,
    client_auth_params,
    exchange_code,
    parse_pasted,
)

TOKEN_URL = "https://login.example.test/token"
DEVICE_URL = "https://login.example.test/devicecode"
SECRET = "s3cret-client-value"
T0 = 1_700_000_000.0
RFC7636_VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
RFC7636_CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def account(**overrides: Any) -> Account:
    data: dict[str, Any] = {
        "address": "alice@example.test",
        "provider": "custom",
        "client_id": "client-1",
        "client_secret": SECRET,
        "token_url": TOKEN_URL,
        "authorize_url": "https://login.example.test/authorize",
        "device_authorization_url": DEVICE_URL,
        "imap_server": "imap.example.test:993",
        "scopes": ["mail", "offline_access"],
    }
    data.update(overrides)
    return Account.model_validate({k: v for k, v in data.items() if v is not None})


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    header, claims, signature = token.split(".")
    return (json.loads(b64url_decode(header)), json.loads(b64url_decode(claims)),
            f"{header}.{claims}".encode(), b64url_decode(signature))


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def self_signed(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit")])
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))


def pem_key(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
            password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption)


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa_key()


@pytest.fixture(scope="module")
def cert(key: rsa.RSAPrivateKey) -> x509.Certificate:
    return self_signed(key)


def key_body_lines(pem: bytes) -> list[str]:
    """The base64 lines of a PEM block: none may ever appear in an error text."""
    return [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]


# -------------------------------------------------------------------- PKCE and the URL


def test_pkce_challenge_matches_rfc7636_appendix_b() -> None:
    url = authorization_url(account(), "http://127.0.0.1:8765/", "st", RFC7636_VERIFIER)
    query = dict(parse_qsl(urlsplit(url).query))
    assert query["code_challenge"] == RFC7636_CHALLENGE
    assert query["code_challenge_method"] == "S256"


def test_authorization_url_for_a_custom_provider() -> None:
    url = authorization_url(account(), "http://127.0.0.1:8765/", "the-state", RFC7636_VERIFIER)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://login.example.test/authorize"
    query = parse_qs(parts.query)
    assert query == {
        "response_type": ["code"], "client_id": ["client-1"],
        "redirect_uri": ["http://127.0.0.1:8765/"], "scope": ["mail offline_access"],
        "state": ["the-state"], "code_challenge": [RFC7636_CHALLENGE],
        "code_challenge_method": ["S256"], "login_hint": ["alice@example.test"],
    }


def test_authorization_url_gmail_asks_for_offline_access() -> None:
    gmail = account(provider="gmail", token_url=None, authorize_url=None,
                    device_authorization_url=None, scopes=None, imap_server=None)
    query = dict(parse_qsl(urlsplit(authorization_url(gmail, "http://127.0.0.1:1/", "s",
                                                      RFC7636_VERIFIER)).query))
    assert urlsplit(gmail.authorize_url or "").netloc == "accounts.google.com"
    assert query["access_type"] == "offline" and query["prompt"] == "consent"
    assert query["scope"] == "https://mail.google.com/"
    assert query["login_hint"] == "alice@example.test"


def test_authorization_url_microsoft() -> None:
    ms = account(provider="office365", tenant="contoso.example", token_url=None,
                 authorize_url=None, device_authorization_url=None, scopes=None,
                 imap_server=None)
    url = authorization_url(ms, "http://127.0.0.1:1/", "s", RFC7636_VERIFIER)
    assert url.startswith("https://login.microsoftonline.com/contoso.example/oauth2/v2.0/"
                          "authorize?")
    query = dict(parse_qsl(urlsplit(url).query))
    assert "offline_access" in query["scope"].split()
    assert "access_type" not in query
    assert query["login_hint"] == "alice@example.test"


# ------------------------------------------------------------------ pasted addresses


@pytest.mark.parametrize(
    ("pasted", "expected"),
    [
        ("http://127.0.0.1:8765/?code=4%2F0AX-abc&state=xyz&scope=mail",
         Redirect("4/0AX-abc", "xyz", None, None)),
        ("  <http://localhost:8765/cb?state=xyz&code=abc>  ", Redirect("abc", "xyz", None, None)),
        ("127.0.0.1:8765/?code=abc&state=xyz", Redirect("abc", "xyz", None, None)),
        ("?code=abc&state=xyz", Redirect("abc", "xyz", None, None)),
        ("code=abc&state=xyz", Redirect("abc", "xyz", None, None)),
        ("http://127.0.0.1:1/#code=abc&state=xyz", Redirect("abc", "xyz", None, None)),
        ("http://127.0.0.1:1/?error=access_denied&error_description=No+thanks&state=xyz",
         Redirect(None, "xyz", "access_denied", "No thanks")),
        ("4/0AX4XfWh-bare_code.x", Redirect("4/0AX4XfWh-bare_code.x", None, None, None)),
        ("4%2F0AX4XfWh", Redirect("4/0AX4XfWh", None, None, None)),
        ('"M.C507_BAY.2.U.abc"', Redirect("M.C507_BAY.2.U.abc", None, None, None)),
        ("", None),
        ("   ", None),
        ("two words", None),
        ("http://127.0.0.1:8765/?state=xyz", None),
        ("http://127.0.0.1:8765/", None),
    ],
)
def test_parse_pasted(pasted: str, expected: Redirect | None) -> None:
    assert parse_pasted(pasted) == expected


# ------------------------------------------------------------------------------ JWTs


def test_client_assertion_structure_and_signature(
    key: rsa.RSAPrivateKey, cert: x509.Certificate
) -> None:
    credential = CertificateCredential(cert, key)
    token = client_assertion("client-1", TOKEN_URL, credential, now=T0)
    header, claims, signed, signature = jwt_parts(token)

    assert header["alg"] == "RS256" and header["typ"] == "JWT"
    der = cert.public_bytes(serialization.Encoding.DER)
    # x5t is the SHA-1 thumbprint of the DER certificate, base64url without padding.
    expected_x5t = base64.urlsafe_b64encode(cert.fingerprint(hashes.SHA1())).rstrip(b"=")
    assert header["x5t"] == expected_x5t.decode()
    assert b64url_decode(header["x5t"]) == hashlib.sha1(der).digest()
    assert b64url_decode(header["x5t#S256"]) == hashlib.sha256(der).digest()
    assert "=" not in header["x5t"] + header["x5t#S256"]
    assert claims["iss"] == claims["sub"] == "client-1"
    assert claims["aud"] == TOKEN_URL
    assert claims["iat"] == claims["nbf"] == int(T0)
    assert 0 < claims["exp"] - claims["iat"] <= 600
    key.public_key().verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
    other = client_assertion("client-1", TOKEN_URL, credential, now=T0)
    assert jwt_parts(other)[1]["jti"] != claims["jti"]  # never replayable


def test_client_assertion_verifies_with_joserfc(
    key: rsa.RSAPrivateKey, cert: x509.Certificate
) -> None:
    """An independent JOSE implementation accepts what we sign."""
    joserfc_jwt = pytest.importorskip("joserfc.jwt")
    joserfc_jwk = pytest.importorskip("joserfc.jwk")
    token = client_assertion("client-1", TOKEN_URL, CertificateCredential(cert, key), now=T0)
    public = joserfc_jwk.RSAKey.import_key(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    decoded = joserfc_jwt.decode(token, public, algorithms=["RS256"])
    assert decoded.claims["sub"] == "client-1"


def service_account_json(tmp_path: Path, key: rsa.RSAPrivateKey, **overrides: Any) -> Path:
    info: dict[str, Any] = {
        "type": "service_account",
        "private_key_id": "kid-123",
        "private_key": pem_key(key).decode(),
        "client_email": "robot@project.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    info.update(overrides)
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({k: v for k, v in info.items() if v is not None}))
    return path


def test_service_account_assertion(tmp_path: Path, key: rsa.RSAPrivateKey) -> None:
    sa = load_service_account(service_account_json(tmp_path, key))
    assert "key=" not in repr(sa)
    token = service_account_assertion(sa, "alice@example.test", ["https://mail.google.com/"],
                                      TOKEN_URL, now=T0)
    header, claims, signed, signature = jwt_parts(token)
    assert header == {"alg": "RS256", "typ": "JWT", "kid": "kid-123"}
    assert claims == {
        "iss": "robot@project.iam.gserviceaccount.com", "sub": "alice@example.test",
        "scope": "https://mail.google.com/", "aud": TOKEN_URL,
        "iat": int(T0), "exp": int(T0) + 3600,
    }
    key.public_key().verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())


def test_app_token_form_service_account(tmp_path: Path, key: rsa.RSAPrivateKey) -> None:
    acct = account(flow="service_account", client_id="", client_secret=None,
                   scopes=["mail.a", "mail.b"],
                   service_account_file=str(service_account_json(tmp_path, key)))
    form = app_token_form(acct, now=T0)
    assert set(form) == {"grant_type", "assertion"}
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    claims = jwt_parts(form["assertion"])[1]
    assert claims["sub"] == "alice@example.test" and claims["scope"] == "mail.a mail.b"
    assert claims["aud"] == TOKEN_URL


def test_app_token_form_client_credentials() -> None:
    form = app_token_form(account(flow="client_credentials", scopes=["api/.default"]), now=T0)
    assert form == {"grant_type": "client_credentials", "client_id": "client-1",
                    "scope": "api/.default", "client_secret": SECRET}


def test_app_token_form_refuses_interactive_flows() -> None:
    with pytest.raises(FlowError, match=r"mailproxy authorize alice@example\.test"):
        app_token_form(account(flow="authorization_code"), now=T0)


def test_client_auth_params_secret_public_certificate(
    tmp_path: Path, key: rsa.RSAPrivateKey, cert: x509.Certificate
) -> None:
    assert client_auth_params(account(), TOKEN_URL, now=T0) == {"client_secret": SECRET}
    assert client_auth_params(account(client_secret=None), TOKEN_URL, now=T0) == {}
    path = tmp_path / "both.pem"
    path.write_bytes(pem_key(key) + pem_cert(cert))  # key first: order must not matter
    params = client_auth_params(account(client_secret=None, client_certificate=str(path)),
                                "https://other.example.test/token", now=T0)
    assert params["client_assertion_type"] == CLIENT_ASSERTION_TYPE
    assert jwt_parts(params["client_assertion"])[1]["aud"] == "https://other.example.test/token"


# -------------------------------------------------------------- unusable key files


def cert_account(tmp_path: Path, cert_pem: bytes, key_pem: bytes | None) -> Account:
    cert_path = tmp_path / "client.crt"
    cert_path.write_bytes(cert_pem)
    key_path = None
    if key_pem is not None:
        key_path = tmp_path / "client.key"
        key_path.write_bytes(key_pem)
    return account(client_secret=None, client_certificate=str(cert_path),
                   client_certificate_key=str(key_path) if key_path else None)


def test_encrypted_key(tmp_path: Path, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> None:
    encrypted = pem_key(key, b"pw")
    acct = cert_account(tmp_path, pem_cert(cert), encrypted)
    with pytest.raises(FlowError, match="is encrypted") as caught:
        client_auth_params(acct, TOKEN_URL, now=T0)
    assert not any(line in str(caught.value) for line in key_body_lines(encrypted))


def test_key_of_another_certificate(tmp_path: Path, cert: x509.Certificate) -> None:
    other = pem_key(rsa_key())
    with pytest.raises(FlowError, match="does not belong to the certificate") as caught:
        client_auth_params(cert_account(tmp_path, pem_cert(cert), other), TOKEN_URL, now=T0)
    assert not any(line in str(caught.value) for line in key_body_lines(other))


def test_ec_key_is_refused(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    acct = cert_account(tmp_path, pem_cert(self_signed(ec_key)), pem_key(ec_key))
    with pytest.raises(FlowError, match="not an RSA key"):
        client_auth_params(acct, TOKEN_URL, now=T0)


def test_not_a_certificate(tmp_path: Path, key: rsa.RSAPrivateKey) -> None:
    secret_pem = pem_key(key)
    acct = cert_account(tmp_path, secret_pem, None)  # a key where the certificate belongs
    with pytest.raises(FlowError, match="no PEM certificate") as caught:
        client_auth_params(acct, TOKEN_URL, now=T0)
    assert not any(line in str(caught.value) for line in key_body_lines(secret_pem))


def test_missing_key_in_the_certificate_file(tmp_path: Path, cert: x509.Certificate) -> None:
    with pytest.raises(FlowError, match="holds no PEM private key"):
        client_auth_params(cert_account(tmp_path, pem_cert(cert), None), TOKEN_URL, now=T0)


def test_key_file_removed_after_loading_the_config(
    tmp_path: Path, key: rsa.RSAPrivateKey, cert: x509.Certificate
) -> None:
    acct = cert_account(tmp_path, pem_cert(cert), pem_key(key))
    (tmp_path / "client.key").unlink()
    with pytest.raises(FlowError, match="cannot read the client certificate key"):
        client_auth_params(acct, TOKEN_URL, now=T0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json at all", "not a JSON service account key file"),
        (b"[1, 2]", "not a JSON service account key file"),
        (json.dumps({"client_email": "robot@x"}).encode(), "lacks private_key"),
        (json.dumps({"client_email": "robot@x", "private_key": "garbage"}).encode(),
         "holds no PEM private key"),
    ],
)
def test_bad_service_account_files(
    tmp_path: Path, key: rsa.RSAPrivateKey, content: bytes, message: str
) -> None:
    path = tmp_path / "sa.json"
    path.write_bytes(content)
    acct = account(flow="service_account", client_id="", client_secret=None,
                   service_account_file=str(path))
    with pytest.raises(FlowError, match=message):
        app_token_form(acct, now=T0)


def test_grant_repr_hides_tokens() -> None:
    grant = Grant("AT-SECRET-VALUE", "RT-SECRET-VALUE", T0, "mail")
    text = repr(grant) + str(grant)
    assert "SECRET" not in text
    assert "expires_at=1700000000.0" in text and "'mail'" in text
    assert "refresh_token=None" in repr(Grant("AT-SECRET-VALUE", None, None, None))


# ------------------------------------------------------- flows over a scripted endpoint


class Console:
    def __init__(self, answers: list[Callable[[Console], str]] | None = None) -> None:
        self.said: list[str] = []
        self.answers = deque(answers or [])

    def say(self, text: str) -> None:
        self.said.append(text)

    def ask(self, prompt: str) -> str:
        if not self.answers:
            raise EOFError
        return self.answers.popleft()(self)

    def open_browser(self, url: str) -> bool:
        return False


class Clock:
    def __init__(self) -> None:
        self.now = T0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


Reply = httpx.Response | Exception


class Endpoint:
    """Answers requests from a script, recording each form."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = deque(replies)
        self.forms: list[dict[str, str]] = []
        self.urls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.forms.append(dict(parse_qsl(request.content.decode())))
        self.urls.append(str(request.url))
        reply = self.replies.popleft()
        if isinstance(reply, Exception):
            raise reply
        return reply

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def ok(body: dict[str, Any]) -> httpx.Response:
    return httpx.Response(200, json=body)


def err(error: str, description: str | None = None, status: int = 400) -> httpx.Response:
    body = {"error": error}
    if description:
        body["error_description"] = description
    return httpx.Response(status, json=body)


TOKENS = {"access_token": "AT-1-secret", "refresh_token": "RT-1-secret", "expires_in": 3599,
          "scope": "mail offline_access", "token_type": "Bearer"}
DEVICE = {"device_code": "DC-secret-device-code", "user_code": "BCDF-GHJK",
          "verification_uri": "https://login.example.test/device",
          "verification_uri_complete": "https://login.example.test/device?user_code=BCDF-GHJK",
          "expires_in": 900, "interval": 5}


async def test_manual_flow_sends_a_valid_verifier_and_the_same_redirect_uri() -> None:
    endpoint = Endpoint(ok(TOKENS))

    def paste(console: Console) -> str:
        url = next(w for s in console.said for w in s.split() if "/authorize?" in w)
        query = dict(parse_qsl(urlsplit(url).query))
        paste.query = query  # type: ignore[attr-defined]
        return f"{query['redirect_uri']}?code=the-code&state={query['state']}"

    clock = Clock()
    grant = await authorize(account(), Console([paste]), manual=True,
                            transport=endpoint.transport, clock=clock)
    sent = paste.query  # type: ignore[attr-defined]
    form = endpoint.forms[0]
    verifier = form["code_verifier"]
    assert 43 <= len(verifier) <= 128
    unreserved = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
    assert set(verifier) <= set(unreserved)
    digest = hashlib.sha256(verifier.encode()).digest()
    assert base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == sent["code_challenge"]
    assert form["redirect_uri"] == sent["redirect_uri"]
    assert urlsplit(sent["redirect_uri"]).hostname == "127.0.0.1"
    assert form["grant_type"] == "authorization_code" and form["code"] == "the-code"
    assert form["client_id"] == "client-1" and form["client_secret"] == SECRET
    assert len(sent["state"]) >= 22  # 128 bits or more
    assert grant.expires_at == T0 + 3599 and grant.scope == "mail offline_access"


async def test_device_flow_slow_down_countdown_and_a_network_blip() -> None:
    endpoint = Endpoint(
        ok({**DEVICE, "interval": 20}),
        err("authorization_pending"),
        err("slow_down"),
        httpx.ConnectError("connection refused"),
        err("authorization_pending"),
        httpx.ConnectError("connection refused"),
        ok(TOKENS),
    )
    clock = Clock()
    console = Console()
    grant = await authorize(account(flow="device_code", client_secret=None), console,
                            transport=endpoint.transport, clock=clock, sleep=clock.sleep)

    assert clock.sleeps == [20, 20, 25, 25, 25, 25]  # RFC 8628: 5 s more after slow_down
    assert endpoint.urls[0] == DEVICE_URL
    assert endpoint.forms[0] == {"client_id": "client-1", "scope": "mail offline_access"}
    assert all(f["grant_type"] == "urn:ietf:params:oauth:grant-type:device_code" and
               f["device_code"] == "DC-secret-device-code" for f in endpoint.forms[1:])
    assert "BCDF-GHJK" in console.said[0] and "expires in 15:00" in console.said[0]
    assert DEVICE["verification_uri_complete"] in console.said[0]
    assert sum("not answering" in s for s in console.said) == 1  # said once, not per poll
    # Reminders at least a minute apart: at 65 s and 140 s.
    assert [s for s in console.said if s.startswith("Still waiting")] == [
        "Still waiting for the sign-in; the code BCDF-GHJK expires in 13:55.",
        "Still waiting for the sign-in; the code BCDF-GHJK expires in 12:40."]
    assert grant.refresh_token == "RT-1-secret"
    assert grant.expires_at == T0 + 140 + 3599


@pytest.mark.parametrize("error", ["access_denied", "authorization_declined"])
async def test_device_flow_declined(error: str) -> None:
    endpoint = Endpoint(ok(DEVICE), err(error))
    clock = Clock()
    with pytest.raises(FlowError, match="was declined"):
        await authorize(account(flow="device_code"), Console(), transport=endpoint.transport,
                        clock=clock, sleep=clock.sleep)


async def test_device_flow_expires_on_its_own_clock() -> None:
    endpoint = Endpoint(ok({**DEVICE, "expires_in": 12}), err("authorization_pending"),
                        err("authorization_pending"))
    clock = Clock()
    with pytest.raises(FlowError, match="BCDF-GHJK expired"):
        await authorize(account(flow="device_code"), Console(), transport=endpoint.transport,
                        clock=clock, sleep=clock.sleep)
    assert len(endpoint.forms) == 3  # polls at 5 s and 10 s, none at 15 s


async def test_device_answer_without_codes() -> None:
    endpoint = Endpoint(ok({"verification_uri": "https://x.example.test/"}))
    with pytest.raises(FlowError, match="device authorization endpoint"):
        await authorize(account(flow="device_code"), Console(), transport=endpoint.transport)


async def test_gmail_device_flow_is_explained() -> None:
    gmail = account(provider="gmail", flow="device_code", token_url=None, authorize_url=None,
                    device_authorization_url=None, scopes=None, imap_server=None)
    with pytest.raises(FlowError) as caught:
        await authorize(gmail, Console(), transport=Endpoint().transport)
    assert str(caught.value) == (
        "alice@example.test: Google does not allow the device flow for mail (the mail scope is "
        'refused); use flow = "authorization_code" with `mailproxy authorize --manual '
        'alice@example.test` on a headless machine.')


async def test_microsoft_without_refresh_token_names_offline_access() -> None:
    endpoint = Endpoint(ok(DEVICE), ok({"access_token": "AT", "expires_in": 60}))
    ms = account(provider="office365", flow="device_code", tenant="contoso.example",
                 token_url=TOKEN_URL, device_authorization_url=DEVICE_URL, imap_server=None)
    clock = Clock()
    with pytest.raises(FlowError, match="offline_access"):
        await authorize(ms, Console(), transport=endpoint.transport, clock=clock,
                        sleep=clock.sleep)


async def test_errors_never_echo_secrets(tmp_path: Path, key: rsa.RSAPrivateKey,
                                         cert: x509.Certificate) -> None:
    # A server that echoes what it got must not make us print a secret.
    def echo(request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        return err("invalid_client", "got " + " ".join(form.values()), status=401)

    transport = httpx.MockTransport(echo)
    with pytest.raises(FlowError) as caught:
        await authorize(account(flow="client_credentials"), Console(), transport=transport)
    text = str(caught.value)
    assert SECRET not in text and "[redacted]" in text
    assert "check client_id" in text

    path = tmp_path / "c.pem"
    path.write_bytes(pem_cert(cert) + pem_key(key))
    acct = account(flow="client_credentials", client_secret=None, client_certificate=str(path))
    with pytest.raises(FlowError) as caught:
        await authorize(acct, Console(), transport=transport)
    text = str(caught.value)
    assert "eyJ" not in text  # no JWT
    assert not any(line in text for line in key_body_lines(pem_key(key)))


async def test_aadsts_codes_get_a_hint() -> None:
    endpoint = Endpoint(err("invalid_client", "AADSTS7000218: The request body must contain "
                            "the following parameter: 'client_assertion' or 'client_secret'.\r\n"
                            "Trace ID: 1"))
    with pytest.raises(FlowError) as caught:
        await authorize(account(flow="client_credentials", client_secret=None), Console(),
                        transport=endpoint.transport)
    text = str(caught.value)
    assert "Allow public client flows" in text
    assert "\r" not in text and "\n" not in text


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (httpx.Response(200, text="<html>login</html>"), "other than a JSON object"),
        (httpx.Response(502, text="bad gateway"), "HTTP 502"),
        (httpx.ReadTimeout("slow"), "did not answer in time"),
        (ok({"token_type": "Bearer"}), "without an access token"),
    ],
)
async def test_broken_token_endpoints(reply: Reply, message: str) -> None:
    with pytest.raises(FlowError, match=message):
        await authorize(account(flow="client_credentials"), Console(),
                        transport=Endpoint(reply).transport)


class ShowingConsole(Console):
    """A console that also takes the device code as data (the admin page's)."""

    def __init__(self) -> None:
        super().__init__()
        self.codes: list[DeviceCode] = []

    def show_device_code(self, code: DeviceCode) -> None:
        self.codes.append(code)


async def test_device_code_is_shown_as_data_before_the_first_poll() -> None:
    endpoint = Endpoint(ok(DEVICE), err("authorization_pending"), ok(TOKENS))
    clock = Clock()
    console = ShowingConsole()
    await authorize(account(flow="device_code"), console, transport=endpoint.transport,
                    clock=clock, sleep=clock.sleep)
    assert console.codes == [DeviceCode("BCDF-GHJK", DEVICE["verification_uri"],
                                        DEVICE["verification_uri_complete"], T0 + 900)]
    assert "BCDF-GHJK" in console.said[0]  # the words are still said too


async def test_exchange_code_sends_what_the_loopback_flow_sends() -> None:
    endpoint = Endpoint(ok(TOKENS))
    grant = await exchange_code(account(), "the-code", "http://127.0.0.1:8025/oauth/callback",
                                RFC7636_VERIFIER, transport=endpoint.transport, clock=lambda: T0)
    assert endpoint.urls == [TOKEN_URL]
    assert endpoint.forms[0] == {
        "grant_type": "authorization_code", "code": "the-code",
        "redirect_uri": "http://127.0.0.1:8025/oauth/callback",
        "code_verifier": RFC7636_VERIFIER, "client_id": "client-1", "client_secret": SECRET}
    assert grant.refresh_token == "RT-1-secret" and grant.expires_at == T0 + 3599


async def test_exchange_code_refused() -> None:
    endpoint = Endpoint(err("invalid_grant", "code already used"))
    with pytest.raises(FlowError, match="exchanging the authorization code was refused: "
                                        "invalid_grant"):
        await exchange_code(account(), "c", "http://127.0.0.1:8025/oauth/callback",
                            RFC7636_VERIFIER, transport=endpoint.transport)
