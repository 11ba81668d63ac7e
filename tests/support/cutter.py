"""A TCP relay the test can cut: put it between the proxy and a real server to simulate the
server (or the network) dying at a chosen moment. Runs on the test's event loop.

``cut()`` aborts every connection through it now; ``refusing = True`` aborts new ones as
they come (the server is down) until set back; ``cut_after(n)`` lets ``n`` more bytes
go from client to server, then aborts (TLS passes through untouched, so a byte count is what
the test can see: with a large message, the server has part of it and never its end).
"""

from __future__ import annotations

import asyncio
import contextlib


class Cutter:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.host = "127.0.0.1"
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._budget: int | None = None
        self.refusing = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def cut_after(self, nbytes: int) -> None:
        self._budget = nbytes

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer, up_writer}
        self._writers |= pair
        down = asyncio.create_task(self._pipe(up_reader, writer, pair, watch=False))
        up = asyncio.create_task(self._pipe(reader, up_writer, pair, watch=True))
        self._tasks |= {down, up}
        await asyncio.gather(down, up, return_exceptions=True)
        self._tasks -= {down, up}
        self._writers -= pair

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    pair: set[asyncio.StreamWriter], watch: bool) -> None:
        try:
            while data := await reader.read(65536):
                if watch and self._budget is not None:
                    if len(data) > self._budget:
                        writer.write(data[:self._budget])
                        self._budget = None
                        for w in pair:
                            w.transport.abort()
                        return
                    self._budget -= len(data)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
