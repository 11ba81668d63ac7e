"""The shared TLS read buffer keeps every byte of many concurrent connections intact, and the
open-file limit is raised to the hard limit."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import datetime as dt
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.net import Conn
from proxy.tls.certs import ensure_local_certificates, local_files, wanted_names
from proxy.tls.contexts import build_server_context
from proxy.tls.memory import (
    READ_BUFFER,
    SharedBufferSSLProtocol,
    share_tls_read_buffer,
    unshare_tls_read_buffer,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def shared() -> Iterator[None]:
    original = asyncio.sslproto.SSLProtocol
    assert share_tls_read_buffer()
    assert share_tls_read_buffer()  # idempotent
    try:
        yield
    finally:
        unshare_tls_read_buffer()
        assert asyncio.sslproto.SSLProtocol is not SharedBufferSSLProtocol
        # A daemon run earlier in this process may have installed it: leave things as found.
        asyncio.sslproto.SSLProtocol = original  # type: ignore[misc]


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    state = tmp_path_factory.mktemp("tls")
    ensure_local_certificates(state, wanted_names([]), dt.datetime.now(dt.UTC))
    server = build_server_context(local_files(state).pairs(), "1.2")
    client = ssl.create_default_context(cafile=str(local_files(state).ca_cert))
    return server, client


async def test_many_connections_each_get_their_own_bytes(
        shared: None, contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """60 connections send different data at once, in pieces of every size up to well over
    the buffer; each echo comes back exactly (through ``net.Conn``, as the proxy relays)."""
    server_ctx, client_ctx = contexts
    protocols: list[asyncio.BaseProtocol] = []

    async def echo(conn: Conn) -> None:
        await conn.connected
        while data := await conn.recv():
            conn.write(data)
        conn.close()

    tasks: set[asyncio.Task[None]] = set()

    def factory() -> Conn:
        conn = Conn()
        task = asyncio.get_running_loop().create_task(echo(conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return conn

    server = await asyncio.get_running_loop().create_server(
        factory, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]

    async def client(number: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                                      server_hostname="localhost")
        transport = writer.transport
        protocols.append(transport._ssl_protocol)  # type: ignore[attr-defined]
        payload = os.urandom(number * 9973 + READ_BUFFER * (number % 3))
        writer.write(payload)
        await writer.drain()
        echoed = await reader.readexactly(len(payload))
        assert echoed == payload
        writer.close()
        await writer.wait_closed()

    try:
        await asyncio.gather(*(client(n) for n in range(60)))
    finally:
        server.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
    # Every TLS connection of this loop's thread, both sides, used the one buffer.
    assert all(isinstance(p, SharedBufferSSLProtocol) for p in protocols)
    buffers = {id(p._ssl_buffer) for p in protocols}  # type: ignore[attr-defined]
    assert len(buffers) == 1 and len(protocols[0]._ssl_buffer) == READ_BUFFER  # type: ignore[attr-defined]


async def test_start_tls_uses_the_shared_buffer_too(
        shared: None, contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = contexts
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[asyncio.Transport] = loop.create_future()

    class Plain(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()
            accepted.set_result(transport)

    server = await loop.create_server(Plain, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connecting = asyncio.ensure_future(asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"))
    raw = await accepted
    upgraded = await loop.start_tls(raw, Plain(), server_ctx, server_side=True)
    _, writer = await connecting
    assert upgraded is not None
    assert isinstance(upgraded._ssl_protocol, SharedBufferSSLProtocol)  # type: ignore[attr-defined]
    writer.close()
    upgraded.close()
    server.close()
    await server.wait_closed()


def test_open_file_limit_raised_to_hard_limit() -> None:
    # In a child: the limit is per process and the test run must keep its own.
    code = (
        "import resource\n"
        "from proxy.tls.memory import raise_open_file_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "before, after = raise_open_file_limit()\n"
        "assert before == 256, before\n"
        "assert after == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0], (after, hard)\n"
        "assert raise_open_file_limit() == (hard, hard)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=30)
