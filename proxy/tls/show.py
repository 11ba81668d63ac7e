"""What ``mailproxy tls export-ca`` and ``mailproxy tls info`` print. Both only read: the
daemon makes the certificates at its first start (under the user it runs as)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..config import Settings
from .certs import local_files, san_names


class ShowError(Exception):
    """Nothing to show; the message says why and what to do."""


def _load_chain(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ShowError(f"{path} does not exist yet: mailproxy creates its certificate at its "
                        "first start (mailproxy run)") from None
    except OSError as exc:
        raise ShowError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ShowError(f"{path}: not a PEM certificate ({exc})") from None


def export_ca(settings: Settings) -> str:
    """The local CA certificate in PEM, for clients and devices to trust."""
    if settings.tls.cert_file is not None:
        raise ShowError(f"[tls] cert_file is set ({settings.tls.cert_file}): clients trust "
                        "that certificate's issuer; there is no mailproxy CA to export")
    ca = _load_chain(local_files(settings.state_dir).ca_cert)[0]
    return ca.public_bytes(serialization.Encoding.PEM).decode()


def _fingerprint(cert: x509.Certificate) -> str:
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def _key(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__


def _describe(title: str, cert: x509.Certificate, now: dt.datetime) -> list[str]:
    left = cert.not_valid_after_utc - now
    when = (f"expired {-left.days} days ago" if left.total_seconds() < 0
            else f"{left.days} days left")
    lines = [
        f"{title}",
        f"  subject:     {cert.subject.rfc4514_string()}",
        f"  issuer:      {cert.issuer.rfc4514_string()}",
    ]
    names = san_names(cert)
    if names:
        lines.append(f"  names:       {', '.join(names)}")
    lines += [
        f"  valid:       {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
        f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC ({when})",
        f"  key:         {_key(cert)}",
        f"  SHA-256:     {_fingerprint(cert)}",
    ]
    return lines


def info(settings: Settings, now: dt.datetime | None = None) -> str:
    """Subject, names, expiry and SHA-256 fingerprint of each certificate served, and of the
    local CA."""
    if now is None:
        now = dt.datetime.now(dt.UTC)
    out: list[str] = []
    if settings.tls.cert_file is not None:
        chain = _load_chain(settings.tls.cert_file)
        if not chain:
            raise ShowError(f"{settings.tls.cert_file}: no certificate in it")
        out += _describe(f"certificate (configured): {settings.tls.cert_file}", chain[0], now)
        for number, extra in enumerate(chain[1:], 1):
            out += _describe(f"chain certificate {number}:", extra, now)
        return "\n".join(out) + "\n"
    files = local_files(settings.state_dir)
    for cert_path, _ in files.pairs():
        out += _describe(f"certificate (made by mailproxy): {cert_path}",
                         _load_chain(cert_path)[0], now)
        out.append("")
    out += _describe(f"local CA (mailproxy tls export-ca): {files.ca_cert}",
                     _load_chain(files.ca_cert)[0], now)
    return "\n".join(out) + "\n"
