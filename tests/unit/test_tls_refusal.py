"""A refused TLS handshake reaches the client as its alert (protocol_version) followed by a clean
close, also when the client sent more than its ClientHello; on a listener with ``ssl=`` and after
``start_tls`` on a plain one."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import datetime as dt
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.tls.certs import ensure_local_certificates, local_files, wanted_names
from proxy.tls.contexts import build_server_context
from proxy.tls.memory import share_tls_read_buffer, unshare_tls_read_buffer

# A TLS record of type alert (21), version TLS 1.0, 2 bytes: fatal (2), protocol_version (70).
PROTOCOL_VERSION_ALERT = bytes([21, 3, 1, 0, 2, 2, 70])
# More than the server reads at once (256 KiB): some is still unread when the handshake fails.
MORE = 1024 * 1024


@pytest.fixture
def shared() -> Iterator[None]:
    original = asyncio.sslproto.SSLProtocol
    assert share_tls_read_buffer()
    try:
        yield
    finally:
        unshare_tls_read_buffer()
        asyncio.sslproto.SSLProtocol = original  # type: ignore[misc]


@pytest.fixture(scope="module")
def server_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    state: Path = tmp_path_factory.mktemp("tls")
    ensure_local_certificates(state, wanted_names([]), dt.datetime.now(dt.UTC))
    return build_server_context(local_files(state).pairs(), "1.2")


def tls10_client_hello() -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def refused_client(port: int, before: bytes, extra: int) -> tuple[bytes, str]:
    """Send ``before`` (a plain-text prelude), a TLS 1.0 ClientHello and ``extra`` more bytes;
    return what came back after the prelude's answer, and how the connection ended."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if before:
            sock.sendall(before)
            assert sock.recv(100) == b"go ahead\r\n"
        got = b""
        try:
            sock.sendall(tls10_client_hello() + b"x" * extra)
            while chunk := sock.recv(4096):
                got += chunk
            # The server still reads (and drops) what comes after its FIN: sent to a closed
            # socket, this would be answered with a reset.
            time.sleep(0.2)
            sock.sendall(b"y" * 1000)
            time.sleep(0.1)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(10) == b""
        except (ConnectionResetError, BrokenPipeError):
            return got, "reset"
        return got, "eof"


@pytest.mark.parametrize("extra", [0, MORE])
async def test_listener_with_ssl_sends_the_alert(shared: None, server_context: ssl.SSLContext,
                                                 extra: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, ssl=server_context)
    try:
        port = server.sockets[0].getsockname()[1]
        got, end = await asyncio.to_thread(refused_client, port, b"", extra)
    finally:
        server.close()
        await server.wait_closed()
    assert (got, end) == (PROTOCOL_VERSION_ALERT, "eof")


@pytest.mark.parametrize("extra", [0, MORE])
async def test_start_tls_sends_the_alert(shared: None, server_context: ssl.SSLContext,
                                         extra: int) -> None:
    loop = asyncio.get_running_loop()
    failures: list[BaseException] = []

    class StartTls(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.pause_reading()
            self.transport.write(b"go ahead\r\n")
            task = loop.create_task(self.upgrade())
            tasks.append(task)

        async def upgrade(self) -> None:
            try:
                await loop.start_tls(self.transport, self, server_context, server_side=True)
            except ssl.SSLError as exc:
                failures.append(exc)

    tasks: list[asyncio.Task[None]] = []
    server = await loop.create_server(StartTls, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        got, end = await asyncio.to_thread(refused_client, port, b"STARTTLS\r\n", extra)
        await asyncio.gather(*tasks)
    finally:
        server.close()
        await server.wait_closed()
    assert (got, end) == (PROTOCOL_VERSION_ALERT, "eof")
    # The caller still learns why (the daemon logs it).
    assert len(failures) == 1 and "UNSUPPORTED_PROTOCOL" in str(failures[0])


async def test_without_the_fix_the_alert_is_lost(server_context: ssl.SSLContext) -> None:
    """What asyncio does by itself (the reason for ``refusal``): no alert, and a reset when
    the client sent more. If this starts failing, asyncio fixed it and refusal can go."""
    loop = asyncio.get_running_loop()
    original = asyncio.sslproto.SSLProtocol
    unshare_tls_read_buffer()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, ssl=server_context)
    try:
        port = server.sockets[0].getsockname()[1]
        got, end = await asyncio.to_thread(refused_client, port, b"", MORE)
    finally:
        server.close()
        await server.wait_closed()
        asyncio.sslproto.SSLProtocol = original  # type: ignore[misc]
    assert got == b"" and end == "reset"
