"""``net.Conn`` before the splice, on loopback sockets: a client that never reads its replies
keeps the daemon's buffers bounded, a close does not lose the last reply to a reset, and a
finished splice is freed by reference counting, upstream connections keep alive."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import weakref

from proxy import net
from proxy.net import Conn, splice


async def _serve() -> tuple[asyncio.Server, int, list[Conn]]:
    loop = asyncio.get_running_loop()
    conns: list[Conn] = []

    def make() -> Conn:
        conn = Conn()
        conns.append(conn)
        return conn

    server = await loop.create_server(make, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], conns


async def test_client_that_never_reads_its_replies_stays_bounded() -> None:
    # 3 MB of "a X" grew the daemon from 61 to 158 MB: replies piled up unsent.
    server, port, conns = await _serve()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    await asyncio.sleep(0.05)
    (conn,) = conns
    peak = 0

    async def session() -> None:  # a core answering each 5-byte command with 150 bytes
        nonlocal peak
        while data := await conn.recv():
            conn.write((b"a BAD " + b"x" * 142 + b"\r\n") * data.count(b"\n"))
            assert conn.transport is not None
            peak = max(peak, conn.transport.get_write_buffer_size() + len(conn._buf))

    task = asyncio.create_task(session())
    sent = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3
    chunk = b"a X\r\n" * 2000
    while loop.time() < deadline and sent < 8_000_000:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            await asyncio.sleep(0.01)
    # The client is held back by TCP once both of the daemon's buffers are full.
    assert sent < 8_000_000
    assert peak < 1_000_000, peak
    sock.close()
    await asyncio.wait_for(task, 5)
    server.close()


async def test_close_with_unread_input_does_not_reset_the_last_reply() -> None:
    server, port, conns = await _serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(0.05)
    (conn,) = conns
    writer.write(b"junk\r\n" * 20000)  # unread by the daemon when it closes
    await writer.drain()
    await asyncio.sleep(0.05)
    conn.write(b"* BYE last words\r\n")
    conn.close()
    with contextlib.suppress(ConnectionError):
        writer.write(b"more\r\n" * 1000)
    data = await asyncio.wait_for(reader.read(), 5)  # to EOF: no ConnectionResetError
    assert data == b"* BYE last words\r\n"
    writer.close()
    await asyncio.wait_for(conn.closed, 5)
    server.close()


async def test_a_finished_splice_is_freed_without_the_cyclic_collector() -> None:
    """The two Conns of a splice (and their transports and sockets) go when the session ends,
    by reference counting: with thousands of sessions, waiting for the cyclic collector left
    their memory in use while new sessions allocated around it."""
    server, port, conns = await _serve()
    clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    await asyncio.sleep(0.05)
    a, b = conns
    assert a.transport is not None and b.transport is not None
    refs = [weakref.ref(x) for x in (a, b, a.transport, b.transport)]
    relay = asyncio.create_task(splice(a, b))
    clients[0][1].write(b"hello\r\n")
    assert await clients[1][0].readexactly(7) == b"hello\r\n"
    gc.disable()
    try:
        clients[0][1].close()  # one side goes: the session ends
        await asyncio.wait_for(relay, 5)
        await asyncio.sleep(0.05)  # connection_lost callbacks
        del a, b, relay
        conns.clear()
        assert [r() for r in refs] == [None] * 4
    finally:
        gc.enable()
        for _, writer in clients:
            writer.close()
        server.close()


async def test_upstream_connections_probe_when_idle() -> None:
    """TCP keepalive on what ``open_connection`` opens: a NAT keeps its mapping of an idle
    upstream session (a spare, an IDLE), and a path that died silently gets noticed."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = await net.open_connection("127.0.0.1", port, None, 5)
    try:
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == \
                net.KEEPALIVE_IDLE
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == \
                net.KEEPALIVE_COUNT
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == \
                net.USER_TIMEOUT * 1000
    finally:
        conn.close()
        server.close()
        await server.wait_closed()
