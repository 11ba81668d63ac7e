"""Server contexts: oldest TLS version per protocol, a replaced certificate served to the next
connection, renewal on an injected clock, start-up warnings. Real handshakes on loopback."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import shutil
import ssl
import warnings
from pathlib import Path

import pytest
from cryptography import x509

from proxy.config import ImapListener, Pop3Listener, Settings, SmtpListener, TlsSettings
from proxy.tls.certs import RENEW_BEFORE, SERVER_LIFETIME, local_files
from proxy.tls.contexts import (
    ServerTls,
    TlsSetupError,
    build_server_context,
    startup_warnings,
)
from proxy.tls.listener import accept_implicit
from tests.support.tlsca import TestCA, make_test_ca


class Clock:
    def __init__(self) -> None:
        self.wall = dt.datetime.now(dt.UTC)
        self.mono = 1000.0

    def now(self) -> dt.datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


def old_client(version: ssl.TLSVersion, ca: Path) -> ssl.SSLContext:
    """A client that speaks only ``version`` (an old device)."""
    context = ssl.create_default_context(cafile=str(ca))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = version
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


class _Raw(asyncio.Protocol):
    """Reads nothing before the handshake: a ClientHello read by the plain transport would be
    lost to the TLS layer that ``start_tls`` puts in place."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self.listener.handle(self, transport))
        self.listener.tasks.add(task)
        task.add_done_callback(self.listener.tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class Listener:
    """A loopback TLS server that asks ``ServerTls`` for a context per connection and does the
    handshake with ``start_tls``, the way the shells do."""

    def __init__(self, tls: ServerTls, version: str = "1.2") -> None:
        self.tls = tls
        self.version = version
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, raw: _Raw, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            context = await self.tls.context(self.version)  # type: ignore[arg-type]
            tls = await loop.start_tls(transport, raw, context, server_side=True,
                                       ssl_handshake_timeout=10)
            assert tls is not None
            tls.write(b"* OK\r\n")
            await raw.closed
        except (ssl.SSLError, ConnectionError):
            transport.close()

    async def __aenter__(self) -> int:
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _Raw(self), "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


async def connect(port: int, client: ssl.SSLContext) -> tuple[str, x509.Certificate]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                  server_hostname="localhost")
    try:
        assert await reader.readline() == b"* OK\r\n"
        obj = writer.get_extra_info("ssl_object")
        return obj.version(), x509.load_der_x509_certificate(obj.getpeercert(True))
    finally:
        writer.close()
        await writer.wait_closed()


def settings(tmp_path: Path, version: str = "1.2", **tls: object) -> Settings:
    return Settings(state_dir=tmp_path / "state", tls=TlsSettings(**tls),  # type: ignore[arg-type]
                    imap=ImapListener(tls_min_version=version))  # type: ignore[arg-type]


async def test_generated_certificate_served_and_trusted(tmp_path: Path) -> None:
    tls = ServerTls(settings(tmp_path), hostname="mailbox")
    assert tls.generated
    await tls.start()
    ca = local_files(tmp_path / "state").ca_cert
    async with Listener(tls) as port:
        version, cert = await connect(port, ssl.create_default_context(cafile=str(ca)))
    assert version in ("TLSv1.2", "TLSv1.3")
    assert cert.subject.rfc4514_string().startswith("CN=localhost")


@pytest.mark.parametrize("min_version, accepted", [("1.2", False), ("1.1", False),
                                                   ("1.0", True)])
async def test_tls10_client_accepted_only_when_enabled(tmp_path: Path, min_version: str,
                                                      accepted: bool) -> None:
    tls = ServerTls(settings(tmp_path, min_version))
    await tls.start()
    ca = local_files(tmp_path / "state").ca_cert
    async with Listener(tls, min_version) as port:
        if accepted:
            version, _ = await connect(port, old_client(ssl.TLSVersion.TLSv1, ca))
            assert version == "TLSv1"
            # Lowering the floor does not lower what modern clients get.
            version, _ = await connect(port, ssl.create_default_context(cafile=str(ca)))
            assert version == "TLSv1.3"
        else:
            # asyncio's server side drops the connection instead of sending the alert.
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                await connect(port, old_client(ssl.TLSVersion.TLSv1, ca))
            assert (await connect(port, ssl.create_default_context(cafile=str(ca))))[0]


async def test_tls11_and_tls13_floors(tmp_path: Path) -> None:
    tls = ServerTls(settings(tmp_path), versions=("1.1", "1.3"))
    await tls.start()
    ca = local_files(tmp_path / "state").ca_cert
    async with Listener(tls, "1.1") as port:
        assert (await connect(port, old_client(ssl.TLSVersion.TLSv1_1, ca)))[0] == "TLSv1.1"
    async with Listener(tls, "1.3") as port:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await connect(port, old_client(ssl.TLSVersion.TLSv1_2, ca))
        assert (await connect(port, old_client(ssl.TLSVersion.TLSv1_3, ca)))[0] == "TLSv1.3"


def replace_atomically(src: TestCA, cert: Path, key: Path) -> None:
    for source, target in ((src.server_key, key), (src.server_cert, cert)):
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


async def test_replaced_configured_certificate_served_to_the_next_connection(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first, second = make_test_ca(tmp_path / "a"), make_test_ca(tmp_path / "b")
    # One trust store for both CAs, as after a renewal by the same authority.
    bundle = tmp_path / "cas.pem"
    bundle.write_bytes(first.ca_cert.read_bytes() + second.ca_cert.read_bytes())
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    replace_atomically(first, cert, key)
    clock = Clock()
    tls = ServerTls(settings(tmp_path, cert_file=cert, key_file=key),
                    monotonic=clock.monotonic, check_every=5.0)
    assert not tls.generated
    await tls.start()
    client = ssl.create_default_context(cafile=str(bundle))
    serial_1 = x509.load_pem_x509_certificate(first.server_cert.read_bytes()).serial_number
    serial_2 = x509.load_pem_x509_certificate(second.server_cert.read_bytes()).serial_number
    async with Listener(tls) as port:
        assert (await connect(port, client))[1].serial_number == serial_1
        replace_atomically(second, cert, key)
        # Within check_every the files are not looked at again.
        clock.mono += 1
        assert (await connect(port, client))[1].serial_number == serial_1
        clock.mono += 5
        with caplog.at_level(logging.INFO, "mailproxy.tls"):
            assert (await connect(port, client))[1].serial_number == serial_2
        assert "certificate changed on disk" in caplog.text
        # A certificate whose key is not there yet (a non-atomic renewal half done): the
        # previous one stays in use, and the pair is taken once it is complete.
        shutil.copyfile(first.server_cert, cert)
        clock.mono += 5
        assert (await connect(port, client))[1].serial_number == serial_2
        assert "still serving the previous certificate" in caplog.text
        shutil.copyfile(first.server_key, key)
        clock.mono += 5
        assert (await connect(port, client))[1].serial_number == serial_1


async def test_generated_certificate_renewed_on_the_timer_check(tmp_path: Path) -> None:
    clock = Clock()
    # Issued so that it is due ten minutes from now (and still valid), so that a real client
    # verifies both the first and the renewed leaf.
    today = clock.wall
    clock.wall -= SERVER_LIFETIME - RENEW_BEFORE - dt.timedelta(minutes=10)
    tls = ServerTls(settings(tmp_path), now=clock.now, monotonic=clock.monotonic)
    await tls.start()
    ca = local_files(tmp_path / "state").ca_cert
    client = ssl.create_default_context(cafile=str(ca))
    async with Listener(tls) as port:
        before = (await connect(port, client))[1]
        clock.mono += 10
        assert not await tls.refresh()  # nothing due, nothing changed
        clock.wall = today + dt.timedelta(minutes=9)
        clock.mono += 10
        assert not await tls.refresh()
        clock.wall = today + dt.timedelta(minutes=10)
        clock.mono += 10
        assert await tls.refresh()
        after = (await connect(port, client))[1]
    assert after.serial_number != before.serial_number
    assert after.not_valid_after_utc > before.not_valid_after_utc


async def test_start_fails_with_a_sentence(tmp_path: Path) -> None:
    ca = make_test_ca(tmp_path / "ca")
    tls = ServerTls(settings(tmp_path, cert_file=ca.server_cert, key_file=ca.ca_cert))
    with pytest.raises(TlsSetupError, match=r"cannot load the TLS certificate .*server\.pem"):
        await tls.start()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "tls").write_text("not a directory")
    with pytest.raises(TlsSetupError, match="cannot create the local TLS certificate"):
        await ServerTls(settings(tmp_path)).start()


def test_build_context_key_in_the_certificate_file(tmp_path: Path) -> None:
    ca = make_test_ca(tmp_path / "ca")
    both = tmp_path / "both.pem"
    both.write_bytes(ca.server_cert.read_bytes() + ca.server_key.read_bytes())
    context = build_server_context([(both, None)], "1.2")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_startup_warnings() -> None:
    assert startup_warnings(Settings()) == []
    found = startup_warnings(Settings(
        imap=ImapListener(listen="0.0.0.0:143", require_tls=False),
        pop3=Pop3Listener(listen="192.168.1.2:110"),  # auto: TLS required, no warning
        smtp=SmtpListener(tls_min_version="1.0")))
    assert len(found) == 2
    assert "[imap] listen = '0.0.0.0:143'" in found[0] and "require_tls = false" in found[0]
    assert "[smtp] tls_min_version = '1.0'" in found[1]


async def test_accept_implicit_hands_over_with_what_came_right_after_the_handshake(
        tmp_path: Path) -> None:
    """The SMTP implicit-TLS listener's way: handshake first (the context current at that
    moment), then the protocol gets the TLS transport and every byte the client sent without
    waiting, even what arrived before it took over."""
    tls = ServerTls(settings(tmp_path))
    await tls.start()
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()
    tasks: set[asyncio.Task[asyncio.Protocol]] = set()

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self.data = b""
            transport.write(b"* OK\r\n")

        def data_received(self, data: bytes) -> None:
            self.data += data
            if self.data.endswith(b"\n") and not got.done():
                got.set_result(self.data)

    class First(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()
            tasks.add(loop.create_task(accept_implicit(transport, tls.current("1.2"), 10, Echo)))

    server = await loop.create_server(First, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = ssl.create_default_context(cafile=str(local_files(tmp_path / "state").ca_cert))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                      server_hostname="localhost")
        writer.write(b"EHLO sent without waiting\r\n")  # before the greeting
        assert await reader.readline() == b"* OK\r\n"
        assert await asyncio.wait_for(got, 10) == b"EHLO sent without waiting\r\n"
        (protocol,) = await asyncio.gather(*tasks)
        assert isinstance(protocol, Echo)
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
