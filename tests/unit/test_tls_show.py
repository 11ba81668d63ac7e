"""``mailproxy tls export-ca`` and ``tls info`` output, for generated and configured
certificates."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from proxy.config import Settings, TlsSettings
from proxy.tls.certs import ensure_local_certificates, local_files, wanted_names
from proxy.tls.show import ShowError, export_ca, info
from tests.support.tlsca import make_test_ca

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def fingerprint(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def test_before_the_first_start_both_say_what_to_do(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    for show in (export_ca, info):
        with pytest.raises(ShowError, match=r"ca\.pem|server-ec\.pem.*first start"):
            show(settings)
    assert not (tmp_path / "tls" / "ca.key").exists()  # only the daemon makes them


def test_export_ca_prints_the_ca_pem(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    ensure_local_certificates(tmp_path, wanted_names([]), NOW)
    pem = export_ca(settings)
    assert pem == local_files(tmp_path).ca_cert.read_text()
    assert pem.startswith("-----BEGIN CERTIFICATE-----") and "PRIVATE" not in pem


def test_info_lists_names_expiry_and_fingerprints(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, tls=TlsSettings(names=["printer.lan", "10.0.0.7"]))
    ensure_local_certificates(tmp_path, wanted_names(settings.tls.names, "mailbox"), NOW,
                              hostname="mailbox")
    text = info(settings, now=NOW + dt.timedelta(days=7))
    files = local_files(tmp_path)
    assert "names:       localhost, 127.0.0.1, ::1, mailbox, printer.lan, 10.0.0.7" in text
    assert "key:         ECDSA secp256r1" in text and "key:         RSA 2048" in text
    assert "(390 days left)" in text  # 397-day leaf, a week later
    for path in (files.cert("ec"), files.cert("rsa"), files.ca_cert):
        assert str(path) in text and fingerprint(path) in text
    assert "subject:     CN=mailproxy local CA (mailbox),O=mailproxy" in text


def test_configured_certificate_and_chain(tmp_path: Path) -> None:
    ca = make_test_ca(tmp_path / "ca")
    chain = tmp_path / "fullchain.pem"
    chain.write_bytes(ca.server_cert.read_bytes() + ca.ca_cert.read_bytes())
    settings = Settings(state_dir=tmp_path / "state",
                        tls=TlsSettings(cert_file=chain, key_file=ca.server_key))
    text = info(settings)
    assert f"certificate (configured): {chain}" in text
    assert "chain certificate 1:" in text
    assert fingerprint(ca.server_cert) in text and fingerprint(ca.ca_cert) in text
    with pytest.raises(ShowError, match="cert_file is set"):
        export_ca(settings)
