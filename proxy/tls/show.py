"""What ``mailproxy tls export-ca`` and ``mailproxy tls info`` print. Both only read: the
daemon makes the certificates at its first start (under the user it runs as)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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


@dataclass(frozen=True)
class Summary:
    """One certificate as ``tls info`` and the admin page show it."""

    role: Literal["served", "chain", "ca"]  # a leaf the listeners serve, its chain, our CA
    generated: bool  # made by mailproxy (not [tls] cert_file)
    path: Path
    subject: str
    issuer: str
    names: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    key: str
    sha256: str  # the fingerprint, "AB:CD:..."

    @property
    def title(self) -> str:
        if self.role == "ca":
            return f"local CA (mailproxy tls export-ca): {self.path}"
        if self.role == "chain":
            return "chain certificate:"
        made = "made by mailproxy" if self.generated else "configured"
        return f"certificate ({made}): {self.path}"


def _summary(cert: x509.Certificate, role: Literal["served", "chain", "ca"], generated: bool,
             path: Path) -> Summary:
    return Summary(role, generated, path, cert.subject.rfc4514_string(),
                   cert.issuer.rfc4514_string(), tuple(san_names(cert)),
                   cert.not_valid_before_utc, cert.not_valid_after_utc, _key(cert),
                   _fingerprint(cert))


def summaries(settings: Settings) -> list[Summary]:
    """Each certificate served (and a configured file's chain), then the local CA when
    mailproxy made its own; ``ShowError`` when one cannot be read."""
    if settings.tls.cert_file is not None:
        chain = _load_chain(settings.tls.cert_file)
        if not chain:
            raise ShowError(f"{settings.tls.cert_file}: no certificate in it")
        return [_summary(cert, "chain" if number else "served", False, settings.tls.cert_file)
                for number, cert in enumerate(chain)]
    files = local_files(settings.state_dir)
    out = [_summary(_load_chain(cert_path)[0], "served", True, cert_path)
           for cert_path, _ in files.pairs()]
    return [*out, _summary(_load_chain(files.ca_cert)[0], "ca", True, files.ca_cert)]


def _describe(title: str, summary: Summary, now: dt.datetime) -> list[str]:
    left = summary.not_after - now
    when = (f"expired {-left.days} days ago" if left.total_seconds() < 0
            else f"{left.days} days left")
    lines = [
        f"{title}",
        f"  subject:     {summary.subject}",
        f"  issuer:      {summary.issuer}",
    ]
    if summary.names:
        lines.append(f"  names:       {', '.join(summary.names)}")
    lines += [
        f"  valid:       {summary.not_before:%Y-%m-%d %H:%M} to "
        f"{summary.not_after:%Y-%m-%d %H:%M} UTC ({when})",
        f"  key:         {summary.key}",
        f"  SHA-256:     {summary.sha256}",
    ]
    return lines


def info(settings: Settings, now: dt.datetime | None = None) -> str:
    """Subject, names, expiry and SHA-256 fingerprint of each certificate served, and of the
    local CA."""
    if now is None:
        now = dt.datetime.now(dt.UTC)
    out: list[str] = []
    chain_number = 0
    for summary in summaries(settings):
        title = summary.title
        if summary.role == "chain":
            chain_number += 1
            title = f"chain certificate {chain_number}:"
        out += _describe(title, summary, now)
        if summary.role == "served" and summary.generated:
            out.append("")
    return "\n".join(out) + "\n"
