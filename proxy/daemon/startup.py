"""Start-up failures in one sentence each, with the exit code ``mailproxy run`` ends with."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from pathlib import Path

from ..tokens.store import ensure_private_dir

# `mailproxy run` exit codes (README "Exit status"): 2 the configuration cannot work as
# written (fix it, restarting will not help); 3 something else holds what the daemon needs
# (another mailproxy on this state directory, a port in use): may work once that is gone.
EXIT_CONFIG = 2
EXIT_CONFLICT = 3


class StartupError(Exception):
    """The daemon cannot start; the message names the listener or path and what to do."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def check_state_dir(path: Path) -> None:
    """Create ``path`` if missing and make sure this user can write there."""
    try:
        ensure_private_dir(path)
        fd, name = tempfile.mkstemp(prefix=".writable-", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StartupError(
            f"state directory {path} is not usable by uid {os.geteuid()} ({reason}): create it "
            "for the user mailproxy runs as, or set state_dir", EXIT_CONFIG) from None


def bind_error(name: str, host: str, port: int, exc: OSError) -> StartupError:
    """A listener that cannot be bound (``name``: "imap", or "imaps" for the implicit-TLS
    one), as one sentence naming it and what to do."""
    where = f"the {name} listener {host}:{port}"
    key = f"[{name[:-1]}] tls_listen" if name.endswith("s") else f"[{name}] listen"
    if isinstance(exc, socket.gaierror):
        return StartupError(f"{where}: host {host!r} cannot be resolved ({exc.strerror}); set "
                            f"{key} to an IP address or a resolvable name", EXIT_CONFIG)
    if exc.errno == errno.EADDRINUSE:
        return StartupError(f"{where}: port {port} is already in use by another program; stop "
                            f"it or set {key} to a free port", EXIT_CONFLICT)
    if exc.errno == errno.EACCES and port < 1024:
        return StartupError(f"{where}: ports below 1024 need root or CAP_NET_BIND_SERVICE; use "
                            f"a port of 1024 or above in {key}, or grant the capability",
                            EXIT_CONFIG)
    if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        return StartupError(f"{where}: no network interface of this machine has the address "
                            f"{host}; set {key} to one it has (e.g. 127.0.0.1)", EXIT_CONFIG)
    return StartupError(f"{where} cannot be opened ({exc.strerror or exc}); check {key}",
                        EXIT_CONFIG)
