"""``net.Conn`` before the splice, on loopback sockets: a client that never reads its replies
keeps the daemon's buffers bounded, and a close does not lose the last reply to a reset."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from proxy.net import Conn


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
