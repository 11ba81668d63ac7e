"""mailproxy's own small CA and the server certificates it signs, kept in ``state_dir/tls/``.

Used when ``[tls] cert_file`` is not set. Clients and devices trust the CA once (``mailproxy tls
export-ca``); the server certificates are re-issued before they expire or when the wanted names
change, and the CA stays. Two leaves share the CA: ECDSA for everything modern (cheap
handshakes) and RSA for old devices that know no ECDSA; OpenSSL picks per client.

Everything here blocks (key generation, disk): callers on the event loop use a thread.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..tokens.store import account_lock, atomic_write, ensure_private_dir

log = logging.getLogger("mailproxy.tls")

CA_LIFETIME = dt.timedelta(days=3650)
# Apple refuses TLS server certificates valid for more than 825 days even under a private root;
# browsers 398 days under public ones. Stay under both.
SERVER_LIFETIME = dt.timedelta(days=397)
RENEW_BEFORE = dt.timedelta(days=30)
# Tolerate a client clock a little behind ours.
BACKDATE = dt.timedelta(hours=1)

KeyKind = Literal["ec", "rsa"]
KINDS: tuple[KeyKind, ...] = ("ec", "rsa")
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CertificateError(Exception):
    """A certificate or key that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class LocalFiles:
    """Where the generated files live."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    def cert(self, kind: KeyKind) -> Path:
        return self.dir / f"server-{kind}.pem"

    def key(self, kind: KeyKind) -> Path:
        return self.dir / f"server-{kind}.key"

    def pairs(self) -> list[tuple[Path, Path]]:
        return [(self.cert(kind), self.key(kind)) for kind in KINDS]


@dataclass(frozen=True)
class Issued:
    """The outcome of ``ensure_local_certificates``."""

    files: LocalFiles
    renew_at: dt.datetime  # the earliest moment a leaf is due again
    created_ca: bool
    issued: tuple[KeyKind, ...]  # leaves (re-)issued by this call


def local_files(state_dir: Path) -> LocalFiles:
    return LocalFiles(Path(state_dir) / "tls")


def wanted_names(extra: Sequence[str], hostname: str | None = None) -> list[str]:
    """localhost, the loopback addresses, this machine's name, then ``extra``; no repeats."""
    if hostname is None:
        hostname = socket.gethostname()  # no DNS lookup, unlike getfqdn()
    hostname = hostname.lower().rstrip(".")
    if not hostname.isascii() or not hostname.replace("-", "").replace(".", "").isalnum():
        hostname = ""  # not something a certificate can name
    names: list[str] = []
    for name in ("localhost", "127.0.0.1", "::1", hostname, *extra):
        if name and name not in names:
            names.append(name)
    return names


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def san_names(cert: x509.Certificate) -> list[str]:
    """The certificate's DNS names and IP addresses, in its order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in san if isinstance(n, x509.DNSName | x509.IPAddress)]


def _new_key(kind: KeyKind) -> PrivateKey:
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _usage(*, sign_certs: bool, encipher: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=encipher, data_encipherment=False,
                         key_agreement=False, key_cert_sign=sign_certs, crl_sign=sign_certs,
                         encipher_only=False, decipher_only=False)


def _make_ca(now: dt.datetime, hostname: str) -> tuple[x509.Certificate, PrivateKey]:
    key = _new_key("ec")
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mailproxy"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"mailproxy local CA ({hostname})"[:64]),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(sign_certs=True, encipher=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(kind: KeyKind, names: Sequence[str], now: dt.datetime,
               ca_cert: x509.Certificate, ca_key: PrivateKey,
               ) -> tuple[x509.Certificate, PrivateKey]:
    key = _new_key(kind)
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mailproxy"),
        x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64]),
    ])
    ca_public = ca_cert.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + SERVER_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # RSA key exchange (TLS 1.0 devices) encrypts to the key.
        .add_extension(_usage(sign_certs=False, encipher=kind == "rsa"), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _read_pair(cert_path: Path, key_path: Path, *, strict: bool,
               ) -> tuple[x509.Certificate, PrivateKey] | None:
    """A stored certificate and its key; None when missing, and when broken unless ``strict``
    (then ``CertificateError``: the CA is trusted by clients, so it is not replaced silently)."""
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CertificateError(f"cannot read {exc.filename}: {exc.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError("unsupported key type")
        if cert.public_key() != key.public_key():
            raise ValueError("the key does not belong to the certificate")
    except (ValueError, TypeError) as exc:
        if strict:
            raise CertificateError(
                f"{cert_path} / {key_path}: not a usable certificate and key ({exc}); remove "
                "both to make a new CA (clients must then trust the new one)") from None
        return None
    return cert, key


def _leaf_ok(cert: x509.Certificate, kind: KeyKind, names: Sequence[str],
             ca_cert: x509.Certificate, now: dt.datetime) -> bool:
    want_type = ec.EllipticCurvePublicKey if kind == "ec" else rsa.RSAPublicKey
    if not isinstance(cert.public_key(), want_type):
        return False
    if san_names(cert) != [str(_general_name(n).value) for n in names]:
        return False
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc - RENEW_BEFORE:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def ensure_local_certificates(state_dir: Path, names: Sequence[str],
                              now: dt.datetime | None = None,
                              hostname: str | None = None) -> Issued:
    """Make sure ``state_dir/tls/`` holds a usable CA and server certificates for ``names``
    (as given by ``wanted_names``), creating or re-issuing what is missing, due or wrong.

    Safe against another process doing the same at once (a lock file), and every file is
    replaced atomically, so a reader sees the old or the new version.
    """
    if now is None:
        now = dt.datetime.now(dt.UTC)
    if hostname is None:
        hostname = socket.gethostname()
    files = local_files(state_dir)
    ensure_private_dir(files.dir)
    created_ca = False
    issued: list[KeyKind] = []
    with account_lock(files.dir, "certificates"):
        ca = _read_pair(files.ca_cert, files.ca_key, strict=True)
        # A CA that would expire before a leaf it signs now: a new one (clients must trust it).
        if ca is None or not (ca[0].not_valid_before_utc <= now
                              and now + SERVER_LIFETIME < ca[0].not_valid_after_utc):
            if ca is not None:
                log.warning("the local CA in %s expires soon: made a new one; clients must "
                            "trust it again (mailproxy tls export-ca)", files.dir)
            ca = _make_ca(now, hostname)
            atomic_write(files.ca_key, _key_pem(ca[1]))
            atomic_write(files.ca_cert, _cert_pem(ca[0]))
            created_ca = True
        ca_cert, ca_key = ca
        renew_at: dt.datetime | None = None
        for kind in KINDS:
            leaf = _read_pair(files.cert(kind), files.key(kind), strict=False)
            if leaf is None or not _leaf_ok(leaf[0], kind, names, ca_cert, now):
                leaf = _make_leaf(kind, names, now, ca_cert, ca_key)
                # Key first: a reader that sees the new certificate finds its key.
                atomic_write(files.key(kind), _key_pem(leaf[1]))
                atomic_write(files.cert(kind), _cert_pem(leaf[0]))
                issued.append(kind)
            due = leaf[0].not_valid_after_utc - RENEW_BEFORE
            renew_at = due if renew_at is None else min(renew_at, due)
    assert renew_at is not None
    if created_ca:
        log.info("created a local CA in %s; clients that verify certificates must trust it "
                 "(mailproxy tls export-ca prints it)", files.dir)
    if issued:
        log.info("issued server certificates (%s) for %s, valid until %s", ", ".join(issued),
                 ", ".join(names), (now + SERVER_LIFETIME).strftime("%Y-%m-%d"))
    return Issued(files, renew_at, created_ca, tuple(issued))
