"""systemd's notify protocol with the standard library: READY, RELOADING, STOPPING, STATUS and
the watchdog, as datagrams to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket).

Without ``$NOTIFY_SOCKET`` (not started by systemd with ``Type=notify``) every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("mailproxy.systemd")


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock and other forms: not ours to speak


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None when systemd
    does not watch this process."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (a parent that exec'd us without clearing it)
    return int(usec) / 2e6


class SystemdNotifier:
    """Sends notify datagrams; never raises (a failed notification is logged once)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog = watchdog_interval(env) if self.address is not None else None
        self._sock: socket.socket | None = None
        self._warned = False
        self._status = ""

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> None:
        if self.address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at $NOTIFY_SOCKET: %s", exc)
                self._warned = True

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *self._status_field(status))

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        """``STATUS=text``, sent only when it changed."""
        fields = self._status_field(text)
        if fields:
            self.send(*fields)

    def _status_field(self, text: str | None) -> list[str]:
        if text is None or text == self._status:
            return []
        self._status = text
        return [f"STATUS={text.replace(chr(10), ' ')}"]

    async def run(self, status: Callable[[], str], every: float = 5.0) -> None:
        """Until cancelled: ``WATCHDOG=1`` every half watchdog period, from the event loop (a
        stalled loop misses them and systemd restarts us), and ``STATUS=`` when it changes."""
        if self.address is None:
            return
        interval = min(every, self.watchdog) if self.watchdog else every
        while True:
            if self.watchdog:
                self.send("WATCHDOG=1")
            self.status(status())
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
