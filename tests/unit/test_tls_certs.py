"""The local CA and the server certificates it signs: names, files, renewal, real handshakes."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.tls.certs import (
    CA_LIFETIME,
    RENEW_BEFORE,
    SERVER_LIFETIME,
    CertificateError,
    ensure_local_certificates,
    local_files,
    san_names,
    wanted_names,
)
from proxy.tls.contexts import build_server_context

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
NAMES = wanted_names(["printer.lan", "192.168.1.5"], hostname="MailBox.")


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_wanted_names_order_and_no_repeats() -> None:
    assert NAMES == ["localhost", "127.0.0.1", "::1", "mailbox", "printer.lan", "192.168.1.5"]
    assert wanted_names(["localhost", "x.lan"], hostname="localhost") == [
        "localhost", "127.0.0.1", "::1", "x.lan"]
    # A host name no certificate can carry is left out, not fatal.
    assert "bad host" not in wanted_names([], hostname="bad host")


def test_first_call_creates_ca_and_both_leaves_privately(tmp_path: Path) -> None:
    issued = ensure_local_certificates(tmp_path, NAMES, NOW, hostname="mailbox")
    files = local_files(tmp_path)
    assert issued.created_ca and issued.issued == ("ec", "rsa")
    assert stat.S_IMODE(files.dir.stat().st_mode) == 0o700
    for path in (files.ca_key, files.key("ec"), files.key("rsa")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ca = load(files.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for kind, key_type in (("ec", ec.EllipticCurvePublicKey), ("rsa", rsa.RSAPublicKey)):
        leaf = load(files.cert(kind))
        assert isinstance(leaf.public_key(), key_type)
        assert san_names(leaf) == NAMES
        leaf.verify_directly_issued_by(ca)
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.SERVER_AUTH in eku
        assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(days=398)
    assert issued.renew_at == load(files.cert("ec")).not_valid_after_utc - RENEW_BEFORE


def test_second_call_changes_nothing(tmp_path: Path) -> None:
    ensure_local_certificates(tmp_path, NAMES, NOW)
    files = local_files(tmp_path)
    before = {p: p.read_bytes() for p in files.dir.iterdir()}
    again = ensure_local_certificates(tmp_path, NAMES, NOW + dt.timedelta(days=100))
    assert not again.created_ca and again.issued == ()
    assert {p: p.read_bytes() for p in files.dir.iterdir()} == before


def test_leaf_renewed_before_expiry_ca_kept(tmp_path: Path) -> None:
    first = ensure_local_certificates(tmp_path, NAMES, NOW)
    files = local_files(tmp_path)
    ca_before, leaf_before = files.ca_cert.read_bytes(), load(files.cert("ec"))
    just_before = first.renew_at - dt.timedelta(minutes=1)
    assert ensure_local_certificates(tmp_path, NAMES, just_before).issued == ()
    later = ensure_local_certificates(tmp_path, NAMES, first.renew_at)
    assert later.issued == ("ec", "rsa") and not later.created_ca
    assert files.ca_cert.read_bytes() == ca_before
    leaf_after = load(files.cert("ec"))
    assert leaf_after.serial_number != leaf_before.serial_number
    assert leaf_after.not_valid_after_utc > leaf_before.not_valid_after_utc
    leaf_after.verify_directly_issued_by(load(files.ca_cert))


def test_leaf_reissued_when_names_change(tmp_path: Path) -> None:
    ensure_local_certificates(tmp_path, NAMES, NOW)
    more = [*NAMES, "scanner.lan"]
    assert ensure_local_certificates(tmp_path, more, NOW).issued == ("ec", "rsa")
    assert san_names(load(local_files(tmp_path).cert("rsa"))) == more


def test_broken_leaf_is_reissued_broken_ca_is_not_replaced(tmp_path: Path) -> None:
    ensure_local_certificates(tmp_path, NAMES, NOW)
    files = local_files(tmp_path)
    files.key("ec").write_bytes(b"garbage")
    assert ensure_local_certificates(tmp_path, NAMES, NOW).issued == ("ec",)
    files.ca_key.write_bytes(b"garbage")
    with pytest.raises(CertificateError, match=r"ca\.pem.*remove both to make a new CA"):
        ensure_local_certificates(tmp_path, NAMES, NOW)
    assert files.ca_key.read_bytes() == b"garbage"


def test_ca_near_its_end_is_replaced_and_leaves_follow(tmp_path: Path) -> None:
    ensure_local_certificates(tmp_path, NAMES, NOW)
    old_ca = load(local_files(tmp_path).ca_cert)
    late = NOW + CA_LIFETIME - SERVER_LIFETIME
    issued = ensure_local_certificates(tmp_path, NAMES, late)
    assert issued.created_ca and issued.issued == ("ec", "rsa")
    new_ca = load(local_files(tmp_path).ca_cert)
    assert new_ca.serial_number != old_ca.serial_number
    load(local_files(tmp_path).cert("ec")).verify_directly_issued_by(new_ca)


async def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str
                     ) -> tuple[str | None, bytes]:
    """One real handshake on loopback; returns the version and the server's certificate."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server)
    port = srv.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname=server_hostname)
        assert await reader.readline() == b"* OK\r\n"
        obj = writer.get_extra_info("ssl_object")
        version, der = obj.version(), obj.getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
        return version, der
    finally:
        srv.close()
        await srv.wait_closed()


async def test_clients_trusting_the_ca_verify_every_name(tmp_path: Path) -> None:
    ensure_local_certificates(tmp_path, NAMES, dt.datetime.now(dt.UTC))
    files = local_files(tmp_path)
    server = await asyncio.to_thread(build_server_context, files.pairs(), "1.2")
    client = ssl.create_default_context(cafile=str(files.ca_cert))
    for name in NAMES:
        version, der = await _handshake(server, client, name)
        assert version in ("TLSv1.2", "TLSv1.3")
        # Modern clients get the ECDSA leaf.
        assert isinstance(x509.load_der_x509_certificate(der).public_key(),
                          ec.EllipticCurvePublicKey)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"Hostname mismatch|IP address"):
        await _handshake(server, client, "other.example")
    # Not trusted without the CA.
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(server, ssl.create_default_context(), "localhost")


async def test_a_client_without_ecdsa_gets_the_rsa_leaf(tmp_path: Path) -> None:
    ensure_local_certificates(tmp_path, NAMES, dt.datetime.now(dt.UTC))
    files = local_files(tmp_path)
    server = await asyncio.to_thread(build_server_context, files.pairs(), "1.2")
    client = ssl.create_default_context(cafile=str(files.ca_cert))
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    version, der = await _handshake(server, client, "localhost")
    assert version == "TLSv1.2"
    assert isinstance(x509.load_der_x509_certificate(der).public_key(), rsa.RSAPublicKey)
