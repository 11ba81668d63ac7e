"""One sign-in per account at a time, across processes: ``mailproxy authorize`` and the admin
page both hold a flock on ``state_dir/vault/<account>.authorize`` for a whole sign-in (two at
once would race for the same grant and the same vault).

Never waits: a held lock is ``SignInBusy`` naming who holds it. Blocking (a directory, a file):
callers on an event loop use a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..tokens.store import ensure_private_dir, safe_name

Who = Literal["authorize", "admin"]


@dataclass(frozen=True)
class Holder:
    """Who holds the lock, as it wrote itself into the file."""

    pid: int | None
    who: Who | None  # None: an older mailproxy that wrote only its pid, or not written yet

    @property
    def this_process(self) -> bool:
        return self.pid == os.getpid()


class SignInBusy(Exception):
    def __init__(self, holder: Holder) -> None:
        super().__init__(f"a sign-in is already running (pid {holder.pid or '?'})")
        self.holder = holder


class SignInLock:
    """A lock taken by ``take``; ``release`` (or the end of the process) lets it go."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def lock_path(state_dir: Path, account_key: str) -> Path:
    return state_dir / "vault" / safe_name(account_key, ".authorize")


def _parse(text: str) -> Holder:
    parts = text.split()
    pid = int(parts[0]) if parts and parts[0].isdigit() else None
    word = parts[1] if len(parts) > 1 else ""
    who: Who | None = "authorize" if word == "authorize" else "admin" if word == "admin" else None
    return Holder(pid, who)


def take(state_dir: Path, account_key: str, who: Who) -> SignInLock:
    """The account's sign-in lock, at once, or ``SignInBusy``."""
    path = lock_path(state_dir, account_key)
    ensure_private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _parse(os.pread(fd, 64, 0).decode("ascii", "replace"))
        os.close(fd)
        raise SignInBusy(holder) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {who}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return SignInLock(fd)


@contextlib.contextmanager
def held(state_dir: Path, account_key: str, who: Who) -> Iterator[None]:
    """``take`` for the length of a ``with`` block."""
    lock = take(state_dir, account_key, who)
    try:
        yield
    finally:
        lock.release()
