"""Per-account OAuth2 token state on disk: one private JSON file each, written atomically.

The daemon and the CLI (``mailproxy token import``) may write the same account at the same time:
read-modify-write goes through ``update`` under an flock, and ``changed`` lets the daemon notice a
write by another process. The encrypted vault (``proxy.vault``) is the same kind of
``TokenStore`` and shares the file helpers here; this plain store is what it migrates from.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from hashlib import sha256
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

DIR_MODE = 0o700
FILE_MODE = 0o600
_FORMAT = 1
_NUMBER_FIELDS = frozenset({"expires_at", "last_refresh", "authorized_at"})
# In memory only: whether the vault could be opened.
_TRANSIENT_FIELDS = frozenset({"locked"})
# Well under NAME_MAX (255) once a suffix is added; percent-encoding can triple a name's length.
_MAX_NAME = 200

# What identifies one version of a file: a write replaces the file, so the inode changes, and
# the mtime tells apart the rare reuse of a freed inode number.
Stamp = tuple[int, int]


@dataclass
class TokenState:
    # repr=False: a state printed in a log or a traceback must not show a token.
    refresh_token: str | None = field(default=None, repr=False)
    access_token: str | None = field(default=None, repr=False)
    expires_at: float | None = None  # epoch seconds
    needs_authorization: str | None = None  # why a person must sign in again; None: fine
    last_refresh: float | None = None
    last_error: str | None = None
    # When the current refresh token was obtained (a sign-in or an import), for known deadlines.
    authorized_at: float | None = None
    # The vault holding the tokens is not open: the tokens above are None for that reason.
    locked: bool = False

    def to_json(self) -> bytes:
        data: dict[str, Any] = {"format": _FORMAT, **asdict(self)}
        for name in _TRANSIENT_FIELDS:
            data.pop(name, None)
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> TokenState:
        """Parse a state; unknown keys are ignored so newer files still load."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = data.get(f.name)
            if value is None or f.name in _TRANSIENT_FIELDS:
                continue
            if f.name in _NUMBER_FIELDS:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"{f.name} must be a number")
                value = float(value)
            elif not isinstance(value, str):
                raise ValueError(f"{f.name} must be a string")
            values[f.name] = value
        return cls(**values)


class StoreError(Exception):
    """The store cannot read or write an account's state; the message says what to do.

    What the token manager catches from a store besides ``OSError`` and ``ValueError``, so it
    never needs to know which store it has (the vault's errors subclass this)."""


class StoreLocked(StoreError):
    """The account's state is there but cannot be opened yet (a locked vault)."""


class TokenStore(Protocol):
    """Where token state lives. Methods may block briefly (disk); callers on the event loop run
    ``save``/``update`` in a thread, so implementations must be thread-safe per account.
    Methods fail with ``OSError``, ``ValueError`` (damaged data) or a ``StoreError``."""

    def load(self, account_key: str) -> TokenState:
        """The stored state, or an empty ``TokenState`` when there is none."""
        ...

    def save(self, account_key: str, state: TokenState) -> None:
        """Replace the state durably (on disk when this returns)."""
        ...

    def update(self, account_key: str, fn: Callable[[TokenState], TokenState]) -> TokenState:
        """Load, apply ``fn``, save, as one step no other process can interleave with.

        ``fn`` returning a state equal to the one it got writes nothing. Returns the new state.
        """
        ...

    def changed(self, account_key: str) -> bool:
        """Whether the stored state may differ from what this object last loaded or wrote
        (True before the first load). Called on every token request, so it must be cheap."""
        ...


def safe_name(account_key: str, suffix: str) -> str:
    """A file name for an account key: never a path, never ``.`` or ``..``, one per key."""
    if not account_key:
        raise ValueError("empty account key")
    # Percent-encoding is injective and encodes "/" and NUL; the suffix rules out "." and "..".
    name = quote(account_key, safe="@")
    if len(name) > _MAX_NAME:
        # quote() never emits "%s", so a digest name cannot collide with an encoded one.
        name = "%sha256-" + sha256(account_key.encode()).hexdigest()
    return name + suffix


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` and any missing parents as 0700 directories."""
    missing: list[Path] = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:  # another process got there first
            continue
        # The umask can only have removed bits, so there was no moment of wider access; this
        # restores owner bits a strange umask took away. (os.makedirs would apply the mode to
        # the leaf only.)
        os.chmod(directory, DIR_MODE)


def file_stamp(path: Path) -> Stamp | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_ino)


def read_file(path: Path) -> tuple[bytes, Stamp] | None:
    """Contents and stamp of the very version read (fstat on the open file, so no race with a
    replacement between the stat and the read); None if there is no file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        return f.read(), (st.st_mtime_ns, st.st_ino)


def atomic_write(path: Path, data: bytes) -> Stamp:
    """Replace ``path`` with ``data``: readers (and a crash) see the old or the new file, never a
    mix. The file is 0600 from its creation. Returns the new file's stamp."""
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)  # exact mode, whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            st = os.fstat(f.fileno())  # rename keeps the inode and mtime
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable: without this a crash can bring back the old file, and with
    # it a rotated-away refresh token.
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return (st.st_mtime_ns, st.st_ino)


@contextlib.contextmanager
def account_lock(directory: Path, account_key: str) -> Iterator[None]:
    """Exclusive across processes and threads for one account's files in ``directory``.

    A separate lock file: data files are replaced on every write, so a lock on one would be a
    lock on a file nobody opens next. flock (unlike fcntl locks) also excludes other threads of
    this process, since each call opens its own file description."""
    ensure_private_dir(directory)
    lock_path = directory / safe_name(account_key, ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class FileTokenStore:
    """``state_dir/tokens/<account>.json``, plain JSON for now."""

    def __init__(self, state_dir: Path) -> None:
        self._dir = Path(state_dir) / "tokens"
        # Stamp of the file version this object last loaded or wrote, per account.
        self._seen: dict[str, Stamp | None] = {}

    def path(self, account_key: str) -> Path:
        return self._dir / safe_name(account_key, ".json")

    def load(self, account_key: str) -> TokenState:
        path = self.path(account_key)
        got = read_file(path)
        if got is None:
            self._seen[account_key] = None
            return TokenState()
        raw, stamp = got
        try:
            state = TokenState.from_json(raw)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{path}: not a valid token state file: {exc}") from None
        self._seen[account_key] = stamp
        return state

    def save(self, account_key: str, state: TokenState) -> None:
        with self._locked(account_key):
            self._write(account_key, state)

    def update(self, account_key: str, fn: Callable[[TokenState], TokenState]) -> TokenState:
        with self._locked(account_key):
            old = self.load(account_key)
            new = fn(old)
            if new != old:
                self._write(account_key, new)
            return new

    def changed(self, account_key: str) -> bool:
        if account_key not in self._seen:
            return True
        return file_stamp(self.path(account_key)) != self._seen[account_key]

    def _write(self, account_key: str, state: TokenState) -> None:
        self._seen[account_key] = atomic_write(self.path(account_key), state.to_json())

    def _locked(self, account_key: str) -> contextlib.AbstractContextManager[None]:
        return account_lock(self._dir, account_key)
