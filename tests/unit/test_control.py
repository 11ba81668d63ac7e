"""Status socket: real Unix sockets, a real killed process for the stale case, a real other uid."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.daemon.control import (
    MAX_REQUEST,
    ControlError,
    ControlServer,
    peer_allowed,
    query,
    query_sync,
)

STATUS = {"accounts": [{"address": "alice@example.com", "state": "ok"}], "version": "0.1.0"}


@pytest.fixture
def base() -> Iterator[Path]:
    # Not tmp_path: a Unix socket path must fit in 107 bytes, and pytest's can be long.
    path = Path(tempfile.mkdtemp(prefix="mpctl", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock_path(base: Path) -> Path:
    return base / "run" / "control.sock"


async def status_handler(command: str) -> dict[str, Any]:
    return {**STATUS, "command": command}


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def raw_exchange(path: Path, data: bytes, *, shut: bool = False, timeout: float = 5.0) -> bytes:
    """Send bytes as they are and read everything until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


async def started(path: Path, handler: Callable[[str], Awaitable[dict[str, Any]]] = status_handler,
                  **kwargs: Any) -> ControlServer:
    server = ControlServer(path, handler, **kwargs)
    await server.start()
    return server


# --- round trips -------------------------------------------------------------------------------


async def test_round_trip_async_and_sync(sock_path: Path) -> None:
    server = await started(sock_path)
    try:
        assert await query(sock_path) == {**STATUS, "command": "status"}
        assert await asyncio.to_thread(query_sync, sock_path) == {**STATUS, "command": "status"}
        # Several at once.
        replies = await asyncio.gather(*(query(sock_path) for _ in range(20)))
        assert all(r == {**STATUS, "command": "status"} for r in replies)
    finally:
        await server.aclose()


async def test_reply_is_one_json_line_and_end_of_input_ends_the_command(sock_path: Path) -> None:
    async def handler(command: str) -> dict[str, Any]:
        return {"text": "two\nlines"}

    server = await started(sock_path, handler)
    try:
        for request, shut in ((b"status\n", False), (b"status", True), (b"  status \r\n", False)):
            raw = await asyncio.to_thread(raw_exchange, sock_path, request, shut=shut)
            assert raw.count(b"\n") == 1 and raw.endswith(b"\n")
            assert json.loads(raw) == {"text": "two\nlines"}
    finally:
        await server.aclose()


async def test_modes(base: Path, sock_path: Path) -> None:
    old = os.umask(0o000)  # the most permissive umask: the modes must not depend on it
    try:
        server = await started(sock_path)
    finally:
        os.umask(old)
    try:
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        assert mode(sock_path) == 0o600
        assert mode(sock_path.parent) == 0o700
    finally:
        await server.aclose()


async def test_unknown_command(sock_path: Path) -> None:
    calls: list[str] = []

    async def handler(command: str) -> dict[str, Any]:
        calls.append(command)
        return {}

    server = await started(sock_path, handler, commands=("status", "accounts"))
    try:
        reply = await query(sock_path, "reboot")
        assert reply == {"error": "unknown command 'reboot'; known: accounts, status"}
        assert await query(sock_path, "accounts") == {}
        assert calls == ["accounts"]  # the unknown one never reached the handler
    finally:
        await server.aclose()


async def test_handler_error_is_an_error_reply_and_a_log_line(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fail = [True]

    async def handler(command: str) -> dict[str, Any]:
        if fail[0]:
            raise RuntimeError("state file unreadable")
        return {"ok": True}

    server = await started(sock_path, handler)
    try:
        with caplog.at_level(logging.ERROR, logger="mailproxy.control"):
            assert await query(sock_path) == {"error": "internal error"}
        assert "state file unreadable" in caplog.text  # the traceback, in the log only
        fail[0] = False
        assert await query(sock_path) == {"ok": True}  # still serving
    finally:
        await server.aclose()


async def test_handler_returning_something_unserialisable(sock_path: Path) -> None:
    async def handler(command: str) -> dict[str, Any]:
        return {"when": object()}

    server = await started(sock_path, handler)
    try:
        assert await query(sock_path) == {"error": "internal error"}
    finally:
        await server.aclose()


async def test_oversized_request_line(sock_path: Path) -> None:
    calls: list[str] = []

    async def handler(command: str) -> dict[str, Any]:
        calls.append(command)
        return {}

    server = await started(sock_path, handler)
    try:
        raw = await asyncio.to_thread(raw_exchange, sock_path, b"s" * (MAX_REQUEST + 10) + b"\n")
        assert json.loads(raw) == {"error": f"request too long (at most {MAX_REQUEST} bytes)"}
        assert calls == []
        with pytest.raises(ValueError):
            await query(sock_path, "x" * (MAX_REQUEST + 1))
        with pytest.raises(ValueError):
            query_sync(sock_path, "status\nreboot")
    finally:
        await server.aclose()


async def test_silent_client_does_not_block_others_and_is_dropped(sock_path: Path) -> None:
    server = await started(sock_path, client_timeout=0.5)
    try:
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b"sta")  # and then nothing
        await writer.drain()
        t0 = time.monotonic()
        assert await query(sock_path) == {**STATUS, "command": "status"}
        assert time.monotonic() - t0 < 0.4
        async with asyncio.timeout(3):
            assert await reader.read() == b""  # dropped after client_timeout, no reply
        writer.close()
    finally:
        await server.aclose()


async def test_slow_handler_is_cut_off(sock_path: Path) -> None:
    async def handler(command: str) -> dict[str, Any]:
        await asyncio.sleep(30)
        return {}

    server = await started(sock_path, handler, client_timeout=0.3)
    try:
        assert await query(sock_path, timeout=3) == {"error": "internal error"}
    finally:
        await server.aclose()


# --- one daemon per socket ---------------------------------------------------------------------


async def test_live_daemon_makes_start_fail(sock_path: Path) -> None:
    first = await started(sock_path)
    try:
        with pytest.raises(ControlError) as info:
            await started(sock_path)
        assert str(info.value) == (
            f"another mailproxy daemon is already running (status socket {sock_path})")
        assert await query(sock_path) == {**STATUS, "command": "status"}  # first one unharmed
    finally:
        await first.aclose()
    second = await started(sock_path)  # the lock went with the first
    await second.aclose()


async def test_live_listener_without_our_lock_is_not_taken_over(base: Path) -> None:
    path = base / "control.sock"
    foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    foreign.bind(str(path))
    foreign.listen(5)
    try:
        stamp = os.lstat(path).st_ino
        with pytest.raises(ControlError, match="already running"):
            await started(path)
        assert os.lstat(path).st_ino == stamp
    finally:
        foreign.close()


async def test_daemon_still_starting_is_not_raced(base: Path) -> None:
    # Another daemon holds the lock but has not bound yet, and a killed one left a stale socket:
    # the probe alone would call the path free, and both would replace the socket.
    path = base / "control.sock"
    _killed_listener(path)
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(base / "control.sock.lock")],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(ControlError, match="already running"):
            await started(path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # left for the lock holder
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    server = await started(path)  # the holder died: its lock went with it
    await server.aclose()


def _killed_listener(path: Path) -> None:
    """A real process that binds and listens at ``path``, then dies by SIGKILL."""
    code = ("import socket, sys, time\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.bind(sys.argv[1]); s.listen(1)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


async def test_stale_socket_of_a_killed_daemon_is_replaced(
    base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = base / "control.sock"
    _killed_listener(path)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert await query(path) is None  # nothing listens: the CLI falls back to disk
    assert query_sync(path) is None
    with caplog.at_level(logging.INFO, logger="mailproxy.control"):
        server = await started(path)
    try:
        assert "replacing stale status socket" in caplog.text
        assert await query(path) == {**STATUS, "command": "status"}
    finally:
        await server.aclose()


async def test_path_that_is_not_a_socket_is_left_alone(base: Path) -> None:
    path = base / "control.sock"
    path.write_text("precious")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        await started(path)
    assert path.read_text() == "precious"


async def test_path_too_long(base: Path) -> None:
    path = base / ("x" * 120) / "control.sock"
    with pytest.raises(ControlError, match="too long"):
        await started(path)
    with pytest.raises(ControlError, match="too long"):
        await query(path)


async def test_aclose_removes_the_socket_only_if_still_ours(sock_path: Path) -> None:
    server = await started(sock_path)
    await server.aclose()
    assert not sock_path.exists()
    assert await query(sock_path) is None

    server = await started(sock_path)
    # Someone replaced the file meanwhile (another daemon after judging us dead): not ours.
    os.unlink(sock_path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(sock_path))
    try:
        await server.aclose()
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    finally:
        other.close()


async def test_aclose_drops_open_connections(sock_path: Path) -> None:
    server = await started(sock_path, client_timeout=30)
    reader, writer = await asyncio.open_unix_connection(sock_path)
    writer.write(b"st")
    await writer.drain()
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await server.aclose()
    assert time.monotonic() - t0 < 2
    async with asyncio.timeout(2):
        assert await reader.read() == b""
    writer.close()


# --- clients against misbehaving servers -------------------------------------------------------


@contextlib.asynccontextmanager
async def fake_server(path: Path, reply: bytes | None) -> AsyncIterator[None]:
    """Reads the request, then answers ``reply`` and closes (None: never answers)."""
    tasks: set[asyncio.Task[Any]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await reader.readline()
            if reply is None:
                await asyncio.sleep(30)
            writer.write(reply or b"")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, path=str(path))
    try:
        yield
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"this is not json\n", "malformed reply"),
        (b"[1, 2]\n", "not an object"),
        (b"", "closed the connection without a reply"),
        (None, "no reply from the daemon"),
    ],
)
async def test_clients_raise_on_bad_replies(base: Path, reply: bytes | None, message: str) -> None:
    path = base / "fake.sock"
    async with fake_server(path, reply):
        with pytest.raises(ControlError, match=message):
            await query(path, timeout=0.5)
        with pytest.raises(ControlError, match=message):
            await asyncio.to_thread(query_sync, path, timeout=0.5)


async def test_query_missing_path(base: Path) -> None:
    assert await query(base / "nothing.sock") is None
    assert query_sync(base / "nothing.sock") is None
    assert await query(base / "no" / "dir" / "nothing.sock") is None


# --- peer credentials --------------------------------------------------------------------------


def test_peer_allowed_is_the_own_uid_only() -> None:
    assert peer_allowed(1000, 1000)
    assert not peer_allowed(1001, 1000)
    assert not peer_allowed(0, 1000)  # not even root
    assert peer_allowed(0, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
async def test_other_uid_is_refused_even_when_file_modes_allow_it(
    base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    async def handler(command: str) -> dict[str, Any]:
        calls.append(command)
        return STATUS

    sock_path = base / "run" / "control.sock"
    server = await started(sock_path, handler)
    # Open everything up, as a socket in a shared directory would be: only the uid check is left.
    os.chmod(base, 0o755)
    os.chmod(sock_path.parent, 0o755)
    os.chmod(sock_path, 0o666)
    code = ("import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.connect(sys.argv[1]); s.sendall(b'status\\n')\n"
            "out = b''\n"
            "while chunk := s.recv(4096): out += chunk\n"
            "sys.stdout.write(out.decode())\n")
    try:
        with caplog.at_level(logging.WARNING, logger="mailproxy.control"):
            # The venv's interpreter may sit under a directory only root can enter.
            for python in (sys.executable, "/usr/bin/python3"):
                try:
                    # In a thread, with subprocess: uvloop's subprocess_exec has no user=.
                    proc = await asyncio.to_thread(
                        subprocess.run, [python, "-I", "-c", code, str(sock_path)],
                        capture_output=True, timeout=30,
                        user=65534, group=65534, extra_groups=[], cwd="/",
                    )
                    break
                except (PermissionError, FileNotFoundError):
                    continue
            else:
                pytest.skip("no Python the user 'nobody' may run")
        assert proc.returncode == 0, proc.stderr.decode()
        assert json.loads(proc.stdout) == {"error": "permission denied"}
        assert calls == []
        assert "refused a connection from uid 65534" in caplog.text
        assert await query(sock_path) == STATUS  # our own uid still gets in
    finally:
        await server.aclose()
