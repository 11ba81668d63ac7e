"""Connection limits per listener (in all, per client address), the protocol reply that
refuses one connection too many, and quiet handling of running out of file descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

from ..net import out_of_resources

log = logging.getLogger("mailproxy")

# Written to a connection over the limits, which is then closed without reading from it.
BUSY = {
    "imap": b"* BYE [UNAVAILABLE] Too many connections; try again later\r\n",
    "pop3": b"-ERR [SYS/TEMP] Too many connections; try again later\r\n",
    "smtp": b"421 4.7.0 Too many connections; try again later\r\n",
}
# How often at most "out of file descriptors" is logged.
RESOURCE_LOG_INTERVAL = 60.0
# Queued connections answered at most per failed accept() (the rest at the next one).
SHED_MAX = 8192


class ConnectionLimits:
    """Open connections of one listener, in all and per client address (0: unlimited)."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self.open = 0
        self._by_ip: dict[str, int] = {}

    def admit(self, host: str) -> bool:
        """Count a new connection from ``host``; False (and not counted) if over a limit."""
        if self.total and self.open >= self.total:
            return False
        count = self._by_ip.get(host, 0)
        if self.per_ip and count >= self.per_ip:
            return False
        self.open += 1
        self._by_ip[host] = count + 1
        return True

    def release(self, host: str) -> None:
        self.open -= 1
        count = self._by_ip.get(host, 0) - 1
        if count > 0:
            self._by_ip[host] = count
        else:
            self._by_ip.pop(host, None)


def refuse(transport: asyncio.BaseTransport, proto: str) -> None:
    """Answer one connection too many and close it, reading nothing from it."""
    if isinstance(transport, asyncio.ReadTransport):
        transport.pause_reading()
    if isinstance(transport, asyncio.WriteTransport):
        transport.write(BUSY[proto])
    transport.close()


class QuietResourceErrors:
    """A loop exception handler for running out of file descriptors (or socket memory).

    When accept() fails so, asyncio logs a traceback, stops accepting on that listener for a
    second, and goes on calling accept() for up to ``backlog`` times in the same tick, each
    failing again and scheduling one more retry (4,096 a second here, a busy loop, and as
    many tracebacks at shutdown when the retries find the listener closed). Here, with one
    file descriptor held in reserve: the connections waiting in the listener's queue are
    answered "try again later" (its ``busy`` reply) and closed, and asyncio's next accept()
    ends its loop; a line is logged at most once a minute; the retries that find their
    listener closed are dropped quietly."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._previous = loop.get_exception_handler()
        self._last = -RESOURCE_LOG_INTERVAL
        self.suppressed = 0
        self.shed = 0  # connections answered "try again later" for lack of descriptors
        self._busy: dict[int, bytes] = {}  # listening socket's fd -> its busy reply
        self._spare = -1
        self._installed = False

    def listen(self, server: asyncio.AbstractServer, busy: bytes) -> None:
        """Shed the queued connections of ``server`` with ``busy`` (b"": just close; an
        implicit-TLS listener has no plain-text reply)."""
        for sock in getattr(server, "sockets", ()):
            self._busy[sock.fileno()] = busy

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and out_of_resources(exc):
            listener = context.get("socket")
            self.shed += self._shed(listener) if listener is not None else 0
            now = time.monotonic()
            if now - self._last >= RESOURCE_LOG_INTERVAL:
                self._last = now
                since = f"; {self.shed} connections answered so since the last message" \
                    if self.shed else ""
                log.error("out of system resources (%s): new connections are answered \"try "
                          "again later\" until some are free again%s", exc.strerror, since)
                self.suppressed = self.shed = 0
            else:
                self.suppressed += 1
            return
        if isinstance(exc, ValueError) and _stale_accept_retry(context):
            return  # asyncio's retry after such an error, for a listener closed since
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def _shed(self, listener: Any) -> int:
        """Answer and close the connections queued on ``listener``; how many."""
        fd = listener.fileno()
        busy = self._busy.get(fd)
        if fd < 0 or busy is None or not self._take_spare():
            return 0
        sock = socket.socket(listener.family, listener.type, listener.proto, fileno=fd)
        count = 0
        try:
            for _ in range(SHED_MAX):
                self._give_spare()  # the accepted connection takes its place for a moment
                try:
                    conn, _ = sock.accept()
                except OSError:  # none left (or a thread took the descriptor)
                    break
                with conn, contextlib.suppress(OSError):
                    conn.setblocking(False)
                    conn.send(busy)
                count += 1
        finally:
            sock.detach()  # the listener's descriptor stays asyncio's
        # Linux fails accept() for lack of a descriptor before it looks at the queue, so
        # asyncio's loop would fail (and schedule a retry) up to `backlog` times more. With
        # the spare descriptor free until that loop is over, its next accept() finds the
        # queue empty and ends it (or takes a connection that just came: served as usual).
        self._loop.call_soon(self._take_spare)
        return count

    def _take_spare(self) -> bool:
        if self._spare < 0 and self._installed:
            try:
                self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return True

    def _give_spare(self) -> None:
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1

    def install(self) -> None:
        self._installed = True
        self._take_spare()
        self._loop.set_exception_handler(self)

    def uninstall(self) -> None:
        self._loop.set_exception_handler(self._previous)
        self._installed = False
        self._give_spare()


def _stale_accept_retry(context: dict[str, Any]) -> bool:
    """asyncio's ``_start_serving`` retry after an accept() error, run after its listener
    was closed (by a stop or a reload): it fails with "Invalid file descriptor: -1"."""
    handle = context.get("handle")
    return handle is not None and "_start_serving" in repr(handle) \
        and "file descriptor" in str(context.get("exception"))
