"""The notify protocol without systemd: a datagram socket the test owns."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from proxy.daemon.systemd import SystemdNotifier, watchdog_interval


def _socket() -> tuple[socket.socket, str]:
    directory = tempfile.mkdtemp(prefix="notify-")  # short: sun_path holds 107 bytes
    path = str(Path(directory) / "n.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    return sock, path


def test_path_socket_gets_ready_reloading_stopping_and_status_once() -> None:
    sock, path = _socket()
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
        assert notifier.enabled and notifier.watchdog is None
        notifier.ready("1 sessions")
        notifier.status("1 sessions")  # unchanged: not sent again
        notifier.reloading()
        notifier.status("2 sessions")
        notifier.stopping()
        got = [sock.recv(4096).decode() for _ in range(4)]
        notifier.close()
    finally:
        sock.close()
        os.unlink(path)
    assert got[0] == "READY=1\nSTATUS=1 sessions"
    assert got[1].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert int(got[1].rsplit("=", 1)[1]) > 0
    assert got[2:] == ["STATUS=2 sessions", "STOPPING=1"]


def test_without_notify_socket_nothing_happens() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    notifier.ready()
    notifier.stopping()
    asyncio.run(asyncio.wait_for(notifier.run(lambda: "x"), 1))  # returns at once


def test_a_vanished_socket_is_not_fatal() -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "/nonexistent/notify.sock"})
    notifier.ready()
    notifier.ready()


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000",
                              "WATCHDOG_PID": str(os.getpid())}) == 15.0


class _Timed(SystemdNotifier):
    """The real notifier, noting the monotonic time of each datagram it sends."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(env)
        self.sent: list[tuple[float, str]] = []

    def send(self, *fields: str) -> None:
        self.sent.append((time.monotonic(), fields[0]))
        super().send(*fields)


def test_watchdog_pings_come_from_the_loop() -> None:
    sock, path = _socket()
    # WATCHDOG_USEC 0.2 s: a ping every 0.1 s (half the period). Wait for the pings themselves,
    # not a fixed window (a busy machine stalls the loop now and then), then check their spacing.
    notifier = _Timed({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})

    def pings() -> list[float]:
        return [at for at, field in notifier.sent if field == "WATCHDOG=1"]

    async def main() -> None:
        task = asyncio.create_task(notifier.run(lambda: "fine"))
        async with asyncio.timeout(10):
            while len(pings()) < 6:
                await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        notifier.close()

    try:
        asyncio.run(main())
        sock.setblocking(False)
        got = []
        while True:
            try:
                got.append(sock.recv(4096).decode())
            except BlockingIOError:
                break
    finally:
        sock.close()
        os.unlink(path)
    assert got[:2] == ["WATCHDOG=1", "STATUS=fine"]
    assert got.count("WATCHDOG=1") == len(pings()) >= 6  # each one reached the socket
    gaps = sorted(b - a for a, b in itertools.pairwise(pings()))
    # Never faster than every 0.1 s; typically 0.1 s: a stall delays a ping or two, but the
    # median of five gaps stays well under the whole period (0.2 s), which a notifier pinging
    # once per period (or once per STATUS interval, 5 s) cannot reach.
    assert gaps[0] >= 0.095, gaps
    assert statistics.median(gaps) < 0.15, gaps
