"""RS256 JSON Web Tokens used as OAuth2 assertions (RFC 7523), signed with ``cryptography``.

Two uses: a client assertion (Microsoft certificate credentials instead of a client secret) and
the JWT bearer grant of a Google Workspace service account. authlib 1.9 deprecates its
``authlib.jose`` and the joserfc it recommends is only an indirect dependency; a JWS this small
is a few lines on top of ``cryptography``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

# Short: a client assertion is made for one request; Microsoft accepts up to 10 minutes.
CLIENT_ASSERTION_LIFETIME = 300
# Google refuses service account assertions that live longer than an hour.
SERVICE_ACCOUNT_ASSERTION_LIFETIME = 3600


class CredentialError(Exception):
    """A key or certificate file that cannot be used; the text names the file, never its content."""


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_part(obj: Mapping[str, object]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":"), sort_keys=True).encode())


def sign_rs256(
    header: Mapping[str, object], claims: Mapping[str, object], key: rsa.RSAPrivateKey
) -> str:
    """A compact JWS: ``header.claims.signature``, RSASSA-PKCS1-v1_5 with SHA-256."""
    signing_input = _json_part({**header, "alg": "RS256", "typ": "JWT"}) + "." + _json_part(claims)
    signature = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url(signature)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CredentialError(f"cannot read the {what} {str(path)!r}: {exc.strerror}") from None


def _rsa_key(data: bytes, path: Path, what: str) -> rsa.RSAPrivateKey:
    # No exception text of the parser is passed on: it is about the key's bytes.
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CredentialError(f"the {what} in {str(path)!r} is encrypted; mailproxy needs it "
                              "unencrypted (protect the file with its permissions)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CredentialError(f"{str(path)!r} holds no PEM private key ('-----BEGIN PRIVATE "
                              "KEY-----' or '-----BEGIN RSA PRIVATE KEY-----') for the "
                              f"{what}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CredentialError(f"the {what} in {str(path)!r} is not an RSA key; RS256 "
                              "signatures need one")
    return key


@dataclass(frozen=True)
class CertificateCredential:
    """A client certificate and its private key (Microsoft "certificate credentials")."""

    certificate: x509.Certificate
    key: rsa.RSAPrivateKey = field(repr=False)

    @property
    def x5t(self) -> str:
        """SHA-1 thumbprint of the DER certificate, base64url: what Microsoft matches on."""
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        return b64url(hashlib.sha1(der, usedforsecurity=False).digest())

    @property
    def x5t_s256(self) -> str:
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        return b64url(hashlib.sha256(der).digest())


def load_certificate_credential(cert_path: Path, key_path: Path | None) -> CertificateCredential:
    """The certificate in ``cert_path`` and its key from ``key_path`` (or the same file)."""
    cert_data = _read(cert_path, "client certificate")
    try:
        # The first certificate is the leaf when the file holds a chain.
        certificate = x509.load_pem_x509_certificates(cert_data)[0]
    except ValueError:
        raise CredentialError(f"{str(cert_path)!r} holds no PEM certificate ('-----BEGIN "
                              "CERTIFICATE-----') for client_certificate") from None
    if key_path is None:
        key_path, key_data = cert_path, cert_data
    else:
        key_data = _read(key_path, "client certificate key")
    key = _rsa_key(key_data, key_path, "client certificate key")
    public = certificate.public_key()
    if not isinstance(public, rsa.RSAPublicKey) or (
        public.public_numbers() != key.public_key().public_numbers()
    ):
        raise CredentialError(f"the private key in {str(key_path)!r} does not belong to the "
                              f"certificate in {str(cert_path)!r}")
    return CertificateCredential(certificate, key)


def client_assertion(
    client_id: str, audience: str, credential: CertificateCredential, *, now: float
) -> str:
    """RFC 7523 section 2.2 client authentication JWT for one token request."""
    issued = int(now)
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": str(uuid.uuid4()),  # servers refuse a replayed assertion
        "nbf": issued,
        "iat": issued,
        "exp": issued + CLIENT_ASSERTION_LIFETIME,
    }
    header = {"x5t": credential.x5t, "x5t#S256": credential.x5t_s256}
    return sign_rs256(header, claims, credential.key)


@dataclass(frozen=True)
class ServiceAccountKey:
    """The parts of a Google service account JSON key file that signing needs."""

    client_email: str
    private_key_id: str | None
    key: rsa.RSAPrivateKey = field(repr=False)
    token_uri: str | None = None


def load_service_account(path: Path) -> ServiceAccountKey:
    data = _read(path, "service account key file")
    try:
        info = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise CredentialError(f"{str(path)!r} is not a JSON service account key file (download "
                              "one under IAM > Service accounts > Keys)") from None
    if not isinstance(info, dict):
        raise CredentialError(f"{str(path)!r} is not a JSON service account key file")
    missing = [k for k in ("client_email", "private_key") if not isinstance(info.get(k), str)]
    if missing:
        raise CredentialError(f"the service account key file {str(path)!r} lacks "
                              f"{' and '.join(missing)}")
    key = _rsa_key(info["private_key"].encode(), path, "service account private_key")
    key_id = info.get("private_key_id")
    token_uri = info.get("token_uri")
    return ServiceAccountKey(
        client_email=info["client_email"],
        private_key_id=key_id if isinstance(key_id, str) else None,
        key=key,
        token_uri=token_uri if isinstance(token_uri, str) else None,
    )


def service_account_assertion(
    account: ServiceAccountKey,
    subject: str,
    scopes: Sequence[str],
    audience: str,
    *,
    now: float,
) -> str:
    """The JWT bearer grant's assertion: the service account acting as ``subject`` (a mailbox)."""
    issued = int(now)
    claims = {
        "iss": account.client_email,
        "sub": subject,
        "scope": " ".join(scopes),
        "aud": audience,
        "iat": issued,
        "exp": issued + SERVICE_ACCOUNT_ASSERTION_LIFETIME,
    }
    header = {"kid": account.private_key_id} if account.private_key_id else {}
    return sign_rs256(header, claims, account.key)
