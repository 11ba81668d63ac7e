"""Connection limits per listener (in all, per client address), the protocol reply that
refuses one connection too many, and quiet handling of running out of file descriptors."""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import Any

log = logging.getLogger("mailproxy")

# Written to a connection over the limits, which is then closed without reading from it.
BUSY = {
    "imap": b"* BYE [UNAVAILABLE] Too many connections; try again later\r\n",
    "pop3": b"-ERR [SYS/TEMP] Too many connections; try again later\r\n",
    "smtp": b"421 4.7.0 Too many connections; try again later\r\n",
}
# How often at most "out of file descriptors" is logged.
RESOURCE_LOG_INTERVAL = 60.0
_RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


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
    """A loop exception handler: asyncio pauses accepting for a second when accept() fails
    for lack of file descriptors, but logs a traceback every time; say it once a minute."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._previous = loop.get_exception_handler()
        self._last = -RESOURCE_LOG_INTERVAL
        self.suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
            now = time.monotonic()
            if now - self._last >= RESOURCE_LOG_INTERVAL:
                self._last = now
                log.error("out of system resources (%s): not accepting connections for a "
                          "moment; %d more such errors since the last message", exc.strerror,
                          self.suppressed)
                self.suppressed = 0
            else:
                self.suppressed += 1
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def install(self) -> None:
        self._loop.set_exception_handler(self)

    def uninstall(self) -> None:
        self._loop.set_exception_handler(self._previous)
