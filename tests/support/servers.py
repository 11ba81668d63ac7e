"""What the private test servers (Dovecot, Postfix) share: loopback ports, a foreground child
process started until every port accepts and stopped until every port refuses, its logs."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import time
from pathlib import Path
from typing import ClassVar

_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` for a server a test starts, never one this process
    handed out before. It is taken below the kernel's ephemeral range: there, between this
    check and the server's bind, the port could go to any outgoing connection on the machine
    (or to the next bind-to-0, which gave two listeners of one config the same port about 1
    config in 600); below it, only an explicit bind can take it."""
    low, high = _ephemeral_range()
    pool = range(10000, low) if low - 10000 >= 2000 else range(high + 1, 65536)
    rng = random.Random()
    for _ in range(1000):
        port = rng.choice(pool)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port found in {pool}")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class ServerError(RuntimeError):
    """A test server did not start or stop; the message carries its log tail."""


class ServerProcess:
    """One server run in the foreground as a child process (in a session of its own), its
    stdout and stderr appended to ``stderr_path``. Subclasses give the command, the ports and
    the log files, and how to ask the server to stop."""

    name: ClassVar[str]
    error: ClassVar[type[ServerError]] = ServerError
    start_timeout: ClassVar[float] = 20.0
    stop_timeout: ClassVar[float] = 10.0
    host = "127.0.0.1"

    stderr_path: Path
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def ports(self) -> dict[str, int]:
        raise NotImplementedError

    @property
    def log_paths(self) -> tuple[Path, ...]:
        """The server's log files, ``stderr_path`` first."""
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _before_start(self) -> None:
        """Anything the server needs done before each start."""

    def _ask_to_stop(self, proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float | None = None) -> None:
        """Start the server (same ports as before) and wait until every listener accepts."""
        if self.running:
            return
        timeout = self.start_timeout if timeout is None else timeout
        self._before_start()
        stderr = self.stderr_path.open("ab")
        try:
            self._proc = proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                start_new_session=True)
        finally:
            stderr.close()
        deadline = time.monotonic() + timeout
        pending = dict(self.ports)
        while pending:
            if proc.poll() is not None:
                self._proc = None
                raise self.error(f"{self.name} exited with status {proc.returncode}:\n"
                                 f"{self.log_tail()}")
            for name, port in list(pending.items()):
                if port_open(self.host, port):
                    del pending[name]
            if pending and time.monotonic() > deadline:
                self.stop()
                raise self.error(f"{self.name} did not open {pending} within {timeout}s:\n"
                                 f"{self.log_tail()}")
            if pending:
                time.sleep(0.05)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the server and all its processes; the ports refuse connections afterwards."""
        timeout = self.stop_timeout if timeout is None else timeout
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._ask_to_stop(proc)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait(5)
        deadline = time.monotonic() + timeout
        while any(port_open(self.host, p) for p in self.ports.values()):
            if time.monotonic() > deadline:
                raise self.error(f"{self.name} ports still open after stop")
            time.sleep(0.05)

    def ensure_running(self) -> None:
        if not self.running:
            self.start()

    def log_text(self) -> str:
        parts = []
        for p in self.log_paths:
            if p.exists():
                text = p.read_text(errors="replace")
                if text:
                    parts.append(f"==> {p.name} <==\n{text}")
        return "\n".join(parts)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
