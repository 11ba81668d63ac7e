"""``net.accept_tls`` on real loopback sockets: implicit TLS whose ClientHello arrives before the
shell gets to the handshake, and bytes sent in the clear after STARTTLS dropped, not read."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from proxy.net import Conn, accept_tls
from proxy.tls.certs import ensure_local_certificates, local_files, wanted_names
from proxy.tls.contexts import build_server_context

Handler = Callable[[Conn], Coroutine[Any, Any, None]]


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    state = tmp_path_factory.mktemp("tls")
    ensure_local_certificates(state, wanted_names([]), dt.datetime.now(dt.UTC))
    server = build_server_context(local_files(state).pairs(), "1.2")
    return server, ssl.create_default_context(cafile=str(local_files(state).ca_cert))


class Server:
    def __init__(self, handler: Handler, *, tls_first: bool) -> None:
        self.handler = handler
        self.tls_first = tls_first
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> tuple[asyncio.Server, int]:
        def factory() -> Conn:
            conn = Conn(tls_first=self.tls_first)
            task = asyncio.get_running_loop().create_task(self.run(conn))
            self.tasks.add(task)
            return conn

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1]

    async def run(self, conn: Conn) -> None:
        await conn.connected
        try:
            await self.handler(conn)
        finally:
            conn.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Coroutine[Any, Any, int]]]:
    servers: list[tuple[asyncio.Server, Server]] = []

    async def start(handler: Handler, *, tls_first: bool = False) -> int:
        holder = Server(handler, tls_first=tls_first)
        server, port = await holder.start()
        servers.append((server, holder))
        return port

    yield start
    for server, holder in servers:
        server.close()
        await asyncio.gather(*holder.tasks, return_exceptions=True)
        await server.wait_closed()


async def test_implicit_tls_client_hello_before_the_handshake_call(
        serve: Any, contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = contexts
    results: list[int] = []

    async def handler(conn: Conn) -> None:
        await asyncio.sleep(0.2)  # the ClientHello is waiting in the socket by now
        results.append(await accept_tls(conn, server_ctx, 5))
        conn.write(b"* OK hello\r\n")
        assert await conn.recv() == b"a1 NOOP\r\n"
        conn.write(b"a1 OK\r\n")
        await conn.closed

    port = await serve(handler, tls_first=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                                  server_hostname="localhost")
    assert await reader.readline() == b"* OK hello\r\n"
    writer.write(b"a1 NOOP\r\n")
    assert await reader.readline() == b"a1 OK\r\n"
    writer.close()
    assert results == [0]


async def test_bytes_after_starttls_are_dropped(
        serve: Any, contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = contexts
    dropped: list[int] = []
    after: list[bytes] = []

    async def handler(conn: Conn) -> None:
        first = await conn.recv()
        assert first == b"a STARTTLS\r\n"
        await asyncio.sleep(0.3)  # the injected line arrives in the meantime
        dropped.append(await accept_tls(conn, server_ctx, 5,
                                        reply=b"a OK Begin TLS negotiation now\r\n"))
        after.append(await conn.recv())
        conn.write(b"c OK\r\n")
        await conn.closed

    port = await serve(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"a STARTTLS\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)
    injected = b"b LOGIN user password\r\n"
    writer.write(injected)  # pipelined in the clear, without waiting for the go-ahead
    await writer.drain()
    assert await reader.readline() == b"a OK Begin TLS negotiation now\r\n"
    await writer.start_tls(client_ctx, server_hostname="localhost")
    writer.write(b"c NOOP\r\n")
    assert await reader.readline() == b"c OK\r\n"
    writer.close()
    assert dropped == [len(injected)]
    assert after == [b"c NOOP\r\n"]


async def test_failed_handshake_raises(
        serve: Any, contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, _ = contexts
    errors: list[BaseException] = []

    async def handler(conn: Conn) -> None:
        try:
            await accept_tls(conn, server_ctx, 5)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    port = await serve(handler, tls_first=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"a1 LOGIN in the clear\r\n")  # a client that does not speak TLS
    await writer.drain()
    assert await reader.read() == b""
    writer.close()
    await asyncio.sleep(0.1)
    assert len(errors) == 1 and isinstance(errors[0], ssl.SSLError)
