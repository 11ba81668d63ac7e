"""The upstream connection once logged in: replies parsed from bytes (``ReplyParser``, no I/O)
and ``Channel``, the asyncio protocol that writes commands and message bytes and hands the
server's replies back in order.

aiosmtplib does the connection, TLS, EHLO and AUTH; then the transport is handed to a
``Channel``. Relaying needs what aiosmtplib keeps private: several commands in flight
(PIPELINING), a message streamed in chunks with flow control, replies that arrive early.
"""

from __future__ import annotations

import asyncio
import collections

from aiosmtplib import SMTPResponse

# aiosmtplib's bound for one reply; a server that sends more is broken or hostile.
MAX_REPLY = 32 * 1024


class ReplyError(Exception):
    """The server sent something that is not an SMTP reply."""


class ReplyParser:
    """Bytes in, complete replies out; a multi-line reply becomes one, its texts joined by
    "\\n" without the codes (as aiosmtplib gives them)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._texts: list[str] = []

    def feed(self, data: bytes) -> list[SMTPResponse]:
        buffer = self._buffer
        buffer += data
        replies = []
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start:end]).rstrip(b"\r")
            start = end + 1
            code, sep = line[:3], line[3:4]
            if not code.isdigit() or sep not in (b"", b" ", b"-"):
                raise ReplyError(f"not an SMTP reply: {line[:80]!r}")
            self._texts.append(line[4:].strip(b" \t").decode("utf-8", "surrogateescape"))
            if sep != b"-":
                replies.append(SMTPResponse(int(code), "\n".join(self._texts)))
                self._texts = []
        del buffer[:start]
        if len(buffer) + sum(len(t) for t in self._texts) > MAX_REPLY:
            raise ReplyError("reply too long")
        return replies


class Channel(asyncio.Protocol):
    """The relay side of an upstream connection: takes over ``transport`` at once."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self._parser = ReplyParser()
        self._replies: collections.deque[SMTPResponse] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._paused = False
        # Why the connection is unusable, once it is.
        self.error: Exception | None = None
        transport.set_protocol(self)

    @property
    def open(self) -> bool:
        return self.error is None and not self.transport.is_closing()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except ReplyError as exc:
            self._fail(exc)
            self.transport.abort()
            return
        if replies:
            self._replies.extend(replies)
            self._wake(self._waiter)

    def eof_received(self) -> bool:
        self._fail(ConnectionResetError("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("connection closed"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake(self._drained)

    # -- for the session ------------------------------------------------------------------

    def write(self, data: bytes) -> bool:
        """Send ``data``; True when the transport is above its high-water mark."""
        if not self.open:
            raise self.error or ConnectionResetError("connection closed")
        self.transport.write(data)
        return self._paused

    async def drain(self) -> None:
        while self._paused:
            if not self.open:
                raise self.error or ConnectionResetError("connection closed")
            self._drained = self._loop.create_future()
            try:
                await self._drained
            finally:
                self._drained = None
        if self.error is not None:
            raise self.error

    async def reply(self) -> SMTPResponse:
        """The next reply (the caller bounds the wait with ``asyncio.timeout``)."""
        while not self._replies:
            if self.error is not None:
                raise self.error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._replies.popleft()

    def unsolicited(self) -> list[SMTPResponse]:
        """Replies that nothing asked for (taken away, so they cannot answer the next command)."""
        replies = list(self._replies)
        self._replies.clear()
        return replies

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        self._wake(self._waiter)
        self._wake(self._drained)

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
