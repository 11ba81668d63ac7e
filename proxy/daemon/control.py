"""The daemon's status socket: a Unix domain socket answering one-line commands with one line of
JSON, for ``mailproxy status``. It also makes sure only one daemon runs per socket path.

Protocol: the client sends a command and a newline (``status\\n``; end of input works too), the
server answers one line of JSON (an object) and closes. Errors are objects with an ``error`` key.

Access: the socket file is 0600 in a 0700 directory, and on Linux every connection's peer uid
(SO_PEERCRED) must equal the daemon's own: root and other users are refused even when the file
modes would let them in (a socket in a shared directory, a permissive umask between bind and
chmod). Where SO_PEERCRED does not exist, the file modes are the only guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

from ..tokens.store import FILE_MODE, ensure_private_dir

log = logging.getLogger("mailproxy.control")

# Longest request line: commands are single words; anything longer is not a client of ours.
MAX_REQUEST = 1024
# Longest reply a client accepts: a status of many accounts is a few KB.
MAX_REPLY = 1 << 20
# A connection may take this long from accept to reply; a silent client is dropped after it.
CLIENT_TIMEOUT = 5.0
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_PATH = 107

Handler = Callable[[str], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """The status socket cannot be served or queried; the message says why."""


def peer_allowed(peer_uid: int, own_uid: int) -> bool:
    """Only the daemon's own user may ask. Not root either: root can read the state files
    anyway, and a daemon that answered root would answer whoever runs as root in a container
    or a shared mount namespace."""
    return peer_uid == own_uid


def peer_uid(sock: socket.socket) -> int | None:
    """The connecting process's uid, or None where the platform cannot tell (not Linux)."""
    so_peercred = getattr(socket, "SO_PEERCRED", None)
    if so_peercred is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _check_path_length(path: Path) -> None:
    if len(os.fsencode(path)) > _MAX_PATH:
        raise ControlError(f"status socket path {path} is too long for a Unix socket "
                           f"({len(os.fsencode(path))} bytes, at most {_MAX_PATH}); set "
                           "control_socket to a shorter path")


class AlreadyRunning(ControlError):
    """Another daemon holds this status socket (and its state directory)."""


def _already_running(path: Path) -> ControlError:
    return AlreadyRunning(f"another mailproxy daemon is already running (status socket {path})")


class ControlServer:
    """Serves ``handler(command)`` on a Unix socket at ``path``.

    ``commands``: the commands passed to the handler; any other gets ``{"error": "unknown
    command ..."}`` without reaching it.
    """

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        commands: Collection[str] = ("status",),
        client_timeout: float = CLIENT_TIMEOUT,
    ) -> None:
        self.path = Path(path)
        self._handler = handler
        self._commands = frozenset(commands)
        self._client_timeout = client_timeout
        self._own_uid = os.geteuid()
        self._server: asyncio.Server | None = None
        self._lock_fd: int | None = None
        self._stamp: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we bound
        self._clients: set[asyncio.Task[None]] = set()

    def lock(self) -> None:
        """Take the single-instance lock now (the daemon does it before anything else);
        ControlError when another daemon holds it. ``aclose`` releases it."""
        if self._lock_fd is None:
            _check_path_length(self.path)
            ensure_private_dir(self.path.parent)
            self._take_lock()

    async def start(self) -> None:
        """Bind and serve. Raises ControlError when another daemon serves this path, when the
        path is taken by something that is not a socket, or when it cannot be bound."""
        self.lock()
        try:
            await self._clear_stale_socket()
            sock = self._bind()
            self._server = await asyncio.start_unix_server(
                self._on_client, sock=sock, limit=MAX_REQUEST
            )
        except BaseException:
            self._release_lock()
            raise
        log.debug("status socket listening on %s", self.path)

    async def aclose(self) -> None:
        """Stop serving, drop open connections, remove the socket file if it is still ours."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for task in list(self._clients):
                task.cancel()
            if self._clients:
                await asyncio.gather(*self._clients, return_exceptions=True)
            await server.wait_closed()
        if self._stamp is not None:
            # Another daemon may have replaced it after we were (wrongly) judged dead; its
            # socket is not ours to remove.
            with contextlib.suppress(OSError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._stamp:
                    os.unlink(self.path)
            self._stamp = None
        self._release_lock()

    # --- start-up ---------------------------------------------------------------------------

    def _take_lock(self) -> None:
        # The probe below cannot settle a race between two daemons starting at once (both find
        # the old socket dead, both replace it); a lock held for the daemon's lifetime does,
        # and the kernel drops it when a daemon dies however it dies. The lock file stays:
        # removing it would reopen the race.
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _already_running(self.path) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _clear_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket; remove it or set "
                               "control_socket to another path")
        # A daemon without our lock (another version, another lock directory via a symlink)
        # may still answer there: never take a socket someone listens on.
        try:
            async with asyncio.timeout(2.0):
                _reader, writer = await asyncio.open_unix_connection(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # left behind by a daemon that was killed
        except TimeoutError:
            raise _already_running(self.path) from None  # alive, though its backlog is full
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            raise _already_running(self.path)
        log.info("replacing stale status socket %s", self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(self.path))
            # The peer-uid check covers the moment between bind and chmod.
            os.chmod(self.path, FILE_MODE)
            st = os.lstat(self.path)
            self._stamp = (st.st_dev, st.st_ino)
            sock.listen(64)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if self._stamp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                self._stamp = None
            if exc.errno == errno.EADDRINUSE:
                raise _already_running(self.path) from None
            raise ControlError(f"cannot create status socket {self.path}: {exc}") from None
        return sock

    # --- connections -----------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            reply = await self._answer(reader, writer)
            if reply is not None:
                writer.write(json.dumps(reply).encode() + b"\n")
                async with asyncio.timeout(self._client_timeout):
                    await writer.drain()
        except (TimeoutError, OSError) as exc:
            log.debug("status socket client dropped: %r", exc)
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, Any] | None:
        sock: socket.socket = writer.get_extra_info("socket")
        try:
            uid = peer_uid(sock)
            refused = uid is not None and not peer_allowed(uid, self._own_uid)
        except OSError as exc:
            log.warning("status socket: cannot read the peer's credentials (%s); refused", exc)
            uid, refused = None, True

        # Read the request even from a refused peer (and then ignore it): answering before it
        # is sent would leave that client with a broken pipe instead of "permission denied".
        try:
            async with asyncio.timeout(self._client_timeout):
                line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            line = exc.partial  # end of input ends the command too (printf status | socat)
        except asyncio.LimitOverrunError:
            line = None
        except TimeoutError:
            log.debug("status socket: client sent no command within %gs", self._client_timeout)
            return None
        if refused:
            if uid is not None:
                log.warning("status socket: refused a connection from uid %d", uid)
            return {"error": "permission denied"}
        if line is None:
            return {"error": f"request too long (at most {MAX_REQUEST} bytes)"}
        if not line.strip():
            return None  # connected and left: a liveness probe
        try:
            command = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            return {"error": "bad request (not UTF-8)"}
        if command not in self._commands:
            return {"error": f"unknown command {command[:64]!r}; known: "
                             + ", ".join(sorted(self._commands))}

        started = time.monotonic()
        try:
            async with asyncio.timeout(self._client_timeout):
                reply = await self._handler(command)
            if not isinstance(reply, dict):
                raise TypeError(f"handler returned {type(reply).__name__}, not a dict")
            json.dumps(reply)  # fails here, inside the guard, if not serialisable
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("status socket: command %r failed after %.1fs", command,
                          time.monotonic() - started)
            return {"error": "internal error"}
        return reply


# --- clients -------------------------------------------------------------------------------


def _request(command: str) -> bytes:
    if not command or any(c in command for c in "\r\n\0"):
        raise ValueError(f"invalid command {command!r}")
    data = command.encode() + b"\n"
    if len(data) > MAX_REQUEST:
        raise ValueError("command too long")
    return data


def _parse_reply(path: Path, raw: bytes) -> dict[str, Any]:
    if not raw:
        raise ControlError(f"the daemon at {path} closed the connection without a reply")
    try:
        reply = json.loads(raw)
    except ValueError:
        raise ControlError(f"malformed reply from the daemon at {path}") from None
    if not isinstance(reply, dict):
        raise ControlError(f"malformed reply from the daemon at {path} (not an object)")
    return reply


async def query(
    path: Path, command: str = "status", *, timeout: float = 5.0
) -> dict[str, Any] | None:
    """Ask the daemon; its reply (possibly ``{"error": ...}``), or None when no daemon listens.

    ControlError when something listens but the exchange fails (timeout, malformed reply,
    permission)."""
    data = _request(command)
    path = Path(path)
    _check_path_length(path)
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=MAX_REPLY)
            except (FileNotFoundError, ConnectionRefusedError):
                return None
            try:
                writer.write(data)
                await writer.drain()
                raw = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                raw = exc.partial
            except asyncio.LimitOverrunError:
                raise ControlError(f"reply from the daemon at {path} is too long") from None
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        raise ControlError(f"no reply from the daemon at {path} within {timeout:g}s") from None
    except OSError as exc:
        raise ControlError(f"cannot talk to the daemon at {path}: {exc}") from None
    return _parse_reply(path, raw)


def query_sync(
    path: Path, command: str = "status", *, timeout: float = 5.0
) -> dict[str, Any] | None:
    """``query`` with a plain blocking socket, for the CLI."""
    data = _request(command)
    path = Path(path)
    _check_path_length(path)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(os.fspath(path))
            except (FileNotFoundError, ConnectionRefusedError):
                return None
            sock.sendall(data)
            raw = b""
            while not raw.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                raw += chunk
                if len(raw) > MAX_REPLY:
                    raise ControlError(f"reply from the daemon at {path} is too long")
        except TimeoutError:
            raise ControlError(
                f"no reply from the daemon at {path} within {timeout:g}s") from None
        except PermissionError:
            raise ControlError(f"permission denied: the daemon's status socket {path} belongs "
                               "to another user") from None
        except OSError as exc:
            raise ControlError(f"cannot talk to the daemon at {path}: {exc}") from None
    return _parse_reply(path, raw)
