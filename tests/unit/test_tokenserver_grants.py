"""The test token server refuses what a real one refuses.

The flow tests only prove something if the server they pass against is strict: a server that
took any JWT or any code_verifier would let a broken flow through. These drive
``TokenAuthority`` directly (no HTTP) with assertions that are wrong in one way each.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from proxy.tokens.assertion import CertificateCredential, b64url, client_assertion, sign_rs256
from tests.support.tokenserver import (
    CLIENT_ASSERTION_TYPE,
    DEVICE_CODE_GRANT,
    JWT_BEARER_GRANT,
    OAuthError,
    TokenAuthority,
)

TOKEN_URL = "http://127.0.0.1:1/token"
CLIENT = "cert-client"
ROBOT = "robot@project.iam.gserviceaccount.com"


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def certificate(key: rsa.RSAPrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "grants")])
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return new_key()


@pytest.fixture(scope="module")
def credential(key: rsa.RSAPrivateKey) -> CertificateCredential:
    return CertificateCredential(certificate(key), key)


@pytest.fixture
def authority(key: rsa.RSAPrivateKey, credential: CertificateCredential) -> TokenAuthority:
    auth = TokenAuthority()
    auth.register_client(CLIENT, app_only_user="box@example.test",
                         certificate_pem=credential.certificate.public_bytes(
                             serialization.Encoding.PEM))
    auth.register_client("public-client")
    auth.register_client("secret-client", "the-secret", app_only_user="box@example.test")
    auth.register_service_account(ROBOT, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return auth


def cc_form(assertion: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": assertion}


def client_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": CLIENT, "sub": CLIENT, "aud": TOKEN_URL, "jti": b64url(
        str(time.monotonic_ns()).encode()), "nbf": now, "iat": now, "exp": now + 300}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def refused(authority: TokenAuthority, form: dict[str, str]) -> OAuthError:
    with pytest.raises(OAuthError) as caught:
        authority.handle_token(form, None, TOKEN_URL)
    return caught.value


def test_a_good_client_assertion_is_accepted(
    authority: TokenAuthority, credential: CertificateCredential
) -> None:
    answer = authority.handle_token(
        cc_form(client_assertion(CLIENT, TOKEN_URL, credential, now=time.time())), None,
        TOKEN_URL)
    assert authority.token_info(answer["access_token"])["email"] == "box@example.test"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"aud": "http://127.0.0.1:2/token"}, "aud"),
        ({"exp": int(time.time()) - 5}, "expired"),
        ({"iss": "someone-else"}, "unknown client"),
        ({"sub": "someone-else"}, "iss and sub"),
        ({"jti": None}, "no jti"),
        ({"nbf": int(time.time()) + 3600}, "nbf"),
        ({"exp": int(time.time()) + 3600}, "short-lived"),
    ],
)
def test_client_assertion_claims_are_checked(
    authority: TokenAuthority, credential: CertificateCredential, changes: dict[str, Any],
    reason: str,
) -> None:
    header = {"x5t": credential.x5t}
    token = sign_rs256(header, client_claims(**changes), credential.key)
    error = refused(authority, cc_form(token))
    assert (error.status, error.error) == (401, "invalid_client")
    assert reason in error.description


def test_client_assertion_signature_and_thumbprint_are_checked(
    authority: TokenAuthority, credential: CertificateCredential
) -> None:
    other = new_key()
    forged = sign_rs256({"x5t": credential.x5t}, client_claims(), other)
    assert "Signature" in refused(authority, cc_form(forged)).description
    wrong_x5t = sign_rs256({"x5t": b64url(b"\0" * 20)}, client_claims(), credential.key)
    assert "thumbprint" in refused(authority, cc_form(wrong_x5t)).description
    head, claims, sig = sign_rs256({"x5t": credential.x5t}, client_claims(),
                                   credential.key).split(".")
    tampered = ".".join((head, b64url(b'{"iss":"cert-client","sub":"cert-client"}'), sig))
    assert refused(authority, cc_form(tampered)).error == "invalid_client"
    unsigned = ".".join((b64url(b'{"alg":"none"}'), claims, ""))
    assert "RS256" in refused(authority, cc_form(unsigned)).description


def test_secret_and_public_clients(authority: TokenAuthority) -> None:
    form = {"grant_type": "client_credentials", "client_id": "secret-client"}
    assert refused(authority, form).error == "invalid_client"  # no secret sent
    assert refused(authority, {**form, "client_secret": "nope"}).description == "bad client secret"
    assert authority.handle_token({**form, "client_secret": "the-secret"}, None, TOKEN_URL)
    # A public client may not present a secret (Microsoft: AADSTS700025).
    public = {"grant_type": "client_credentials", "client_id": "public-client",
              "client_secret": "x"}
    assert "must not send one" in refused(authority, public).description
    # ... and without one it is known but not allowed app-only tokens.
    del public["client_secret"]
    assert refused(authority, public).error == "unauthorized_client"


def sa_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": ROBOT, "sub": "box@example.test", "scope": "mail",
                              "aud": TOKEN_URL, "iat": now, "exp": now + 3600}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def bearer(token: str) -> dict[str, str]:
    return {"grant_type": JWT_BEARER_GRANT, "assertion": token}


def test_jwt_bearer_good_and_bad(authority: TokenAuthority, key: rsa.RSAPrivateKey) -> None:
    answer = authority.handle_token(bearer(sign_rs256({}, sa_claims(), key)), None, TOKEN_URL)
    assert "refresh_token" not in answer
    assert authority.token_info(answer["access_token"])["email"] == "box@example.test"
    assert authority.requests_for(JWT_BEARER_GRANT)[-1][1] == "box@example.test"

    now = int(time.time())
    for changes, error in [
        ({"aud": "https://oauth2.googleapis.com/token"}, "invalid_grant"),
        ({"exp": now - 1}, "invalid_grant"),
        ({"exp": now + 7200}, "invalid_grant"),  # Google: at most an hour
        ({"iss": "stranger@x.iam.gserviceaccount.com"}, "invalid_grant"),
        ({"scope": None}, "invalid_scope"),
    ]:
        token = sign_rs256({}, sa_claims(**changes), key)
        assert refused(authority, bearer(token)).error == error, changes
    assert "Signature" in refused(
        authority, bearer(sign_rs256({}, sa_claims(), new_key()))).description
    assert refused(authority, bearer("not.a.jwt")).error == "invalid_grant"


def test_device_grant_states(authority: TokenAuthority) -> None:
    authority.device_interval = 0.0
    start = authority.handle_device_authorization({"client_id": "public-client",
                                                   "scope": "mail"}, None, "http://h:1")
    poll = {"grant_type": DEVICE_CODE_GRANT, "client_id": "public-client",
            "device_code": start["device_code"]}
    assert start["verification_uri_complete"].endswith("user_code=" + start["user_code"])
    assert refused(authority, poll).error == "authorization_pending"
    other = {**poll, "client_id": "secret-client", "client_secret": "the-secret"}
    assert refused(authority, other).error == "invalid_grant"  # another client's code
    authority.approve_device(start["user_code"], "box@example.test")
    answer = authority.handle_token(poll, None, TOKEN_URL)
    assert authority.token_info(answer["access_token"])["email"] == "box@example.test"
    assert refused(authority, poll).error == "invalid_grant"  # used up
    assert [o for _, o in authority.device_polls] == [
        "authorization_pending", "invalid_grant", "ok", "invalid_grant"]


def test_device_code_refresh_token_policy(authority: TokenAuthority) -> None:
    authority.device_interval = 0.0
    authority.authorization_refresh_tokens = "offline"
    for scope, expect_refresh in [("mail", False), ("mail offline_access", True)]:
        start = authority.handle_device_authorization({"client_id": "public-client",
                                                       "scope": scope}, None, "http://h:1")
        authority.approve_device(start["user_code"], "box@example.test")
        answer = authority.handle_token({"grant_type": DEVICE_CODE_GRANT,
                                         "client_id": "public-client",
                                         "device_code": start["device_code"]}, None, TOKEN_URL)
        assert ("refresh_token" in answer) is expect_refresh, scope


def test_authorize_refuses_non_loopback_and_unknown_clients(authority: TokenAuthority) -> None:
    base = {"client_id": "public-client", "response_type": "code", "state": "s",
            "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
            "code_challenge_method": "S256", "login_hint": "box@example.test"}
    assert authority.handle_authorize({**base, "redirect_uri": "https://evil.example/"})[0] == 400
    assert authority.handle_authorize({**base, "client_id": "nobody",
                                       "redirect_uri": "http://127.0.0.1:9/"})[0] == 400
    status, location = authority.handle_authorize({**base, "redirect_uri": "http://[::1]:9/cb"})
    assert status == 302 and location.startswith("http://[::1]:9/cb?code=")
    assert location.endswith("&state=s")
    no_user = {k: v for k, v in base.items() if k != "login_hint"}
    status, location = authority.handle_authorize({**no_user,
                                                   "redirect_uri": "http://127.0.0.1:9/"})
    assert "error=login_required" in location
