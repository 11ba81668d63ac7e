"""Local account passwords: a salted scrypt hash per account, checked off the event loop.

scrypt costs ~100 ms of CPU and 32 MiB per check, so the daemon pays it once per account and
process: after a success it keeps an HMAC of the good password under a random per-process key and
compares against that, until the hash file changes on disk (``mailproxy password set``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .tokens.store import Stamp, atomic_write, ensure_private_dir, file_stamp, read_file, safe_name

log = logging.getLogger("mailproxy.passwords")

SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_HASH_BYTES = 32
# Refuse costs read back from a file beyond this: a bad file must not exhaust memory.
_MAX_MEMORY = 256 * 1024 * 1024


def _scrypt(secret: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    # OpenSSL's default maxmem (32 MiB) is just short of what n=2**15, r=8 needs ("memory limit
    # exceeded"): allow the 128*r*(n+p) bytes it uses plus headroom.
    maxmem = 128 * r * (n + p) + 1024 * 1024
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=_HASH_BYTES)


def _encode(password: str) -> bytes:
    # surrogateescape: a password a client sent as undecodable bytes still round-trips.
    return password.encode("utf-8", "surrogateescape")


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt_b64$hash_b64``."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(_encode(password), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(stored: str, secret: bytes) -> bool:
    """Slow: runs scrypt. Raises ValueError if ``stored`` is not a hash this module wrote."""
    parts = stored.strip().split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not a scrypt$n$r$p$salt$hash string")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        expected = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("malformed number or base64") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * r * (n + p) > _MAX_MEMORY or not expected:
        raise ValueError("scrypt parameters out of range")
    return hmac.compare_digest(_scrypt(secret, salt, n, r, p), expected)


@dataclass(frozen=True)
class _Verified:
    stamp: Stamp  # the hash file version the password was checked against
    digest: bytes  # HMAC-SHA256(process key, password)


class PasswordBook:
    """``state_dir/passwords/<account>.scrypt``, one hash per file."""

    def __init__(self, state_dir: Path) -> None:
        self._dir = Path(state_dir) / "passwords"
        # Random per process: the cached digests are worthless outside this process's memory.
        self._key = secrets.token_bytes(32)
        self._verified: dict[str, _Verified] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Each scrypt holds 32 MiB: bound how many run at once across accounts.
        self._slots = asyncio.Semaphore(os.cpu_count() or 1)

    def path(self, account_key: str) -> Path:
        return self._dir / safe_name(account_key, ".scrypt")

    def set(self, account_key: str, password: str) -> None:
        """Store a new password (blocking: CLI use)."""
        ensure_private_dir(self._dir)
        atomic_write(self.path(account_key), (hash_password(password) + "\n").encode())
        self._verified.pop(account_key, None)

    def has(self, account_key: str) -> bool:
        return file_stamp(self.path(account_key)) is not None

    async def verify(self, account_key: str, password: str) -> bool:
        secret = _encode(password)
        digest = hmac.new(self._key, secret, hashlib.sha256).digest()
        if self._known_good(account_key, digest):
            return True
        # One scrypt at a time per account: concurrent first logins wait here and then hit the
        # cache; it also slows a password-guessing client down to one guess per scrypt.
        lock = self._locks.setdefault(account_key, asyncio.Lock())
        async with lock:
            if self._known_good(account_key, digest):
                return True
            path = self.path(account_key)
            got = read_file(path)
            if got is None:
                return False
            raw, stamp = got
            try:
                async with self._slots:
                    ok = await asyncio.to_thread(check_password, raw.decode("ascii"), secret)
            except ValueError as exc:  # UnicodeDecodeError too
                log.error("%s: unusable password hash in %s: %s", account_key, path, exc)
                return False
            if ok:  # never cache a failure: a wrong password always pays the full price
                self._verified[account_key] = _Verified(stamp, digest)
            return ok

    def _known_good(self, account_key: str, digest: bytes) -> bool:
        verified = self._verified.get(account_key)
        if verified is None:
            return False
        if file_stamp(self.path(account_key)) != verified.stamp:
            # The hash was replaced (or removed) since: the old password may no longer be right.
            del self._verified[account_key]
            return False
        return hmac.compare_digest(verified.digest, digest)
