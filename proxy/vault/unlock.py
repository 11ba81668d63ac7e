"""The daemon's check of a client's local password: scrypt once per process and password, then
an HMAC compare against the logins this process has already verified.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Callable

from ..tokens.keys import encode_password


class UnlockCache:
    """Per account, the passwords verified in this process, as HMAC(process key, password) ->
    the id of the slot it opened. Never a password, never across processes.

    ``add``, ``forget`` and ``known`` are thread-safe (the vault calls them from threads);
    ``unlock`` runs on the event loop."""

    def __init__(self) -> None:
        self._proc_key = secrets.token_bytes(32)
        self._good: dict[str, dict[bytes, str]] = {}
        self._mutex = threading.Lock()
        self._alocks: dict[str, asyncio.Lock] = {}
        # Each scrypt holds 32 MiB: bound how many run at once across accounts.
        self._kdf_slots = asyncio.Semaphore(os.cpu_count() or 1)

    def _digest(self, password: str) -> bytes:
        return hmac.new(self._proc_key, encode_password(password), hashlib.sha256).digest()

    def add(self, account_key: str, password: str, slot_id: str) -> None:
        """``password`` just opened the slot ``slot_id``."""
        digest = self._digest(password)
        with self._mutex:
            self._good.setdefault(account_key, {})[digest] = slot_id

    def forget(self, account_key: str, slot_id: str | None = None) -> None:
        """Drop what opened ``slot_id`` (None: every slot of the account)."""
        with self._mutex:
            if slot_id is None:
                self._good.pop(account_key, None)
                return
            good = self._good.get(account_key, {})
            for digest in [d for d, sid in good.items() if sid == slot_id]:
                del good[digest]

    def _known(self, account_key: str, digest: bytes,
               current: Callable[[str, str], bool]) -> bool:
        with self._mutex:
            slot_id = self._good.get(account_key, {}).get(digest)
        if slot_id is None:
            return False
        if current(account_key, slot_id):
            return True
        # Removed (`password remove`) or the vault was re-created: check from scratch.
        with self._mutex:
            self._good.get(account_key, {}).pop(digest, None)
        return False

    async def unlock(self, account_key: str, password: str, *,
                     current: Callable[[str, str], bool],
                     check: Callable[[str, str], bool]) -> bool:
        """Whether ``password`` opens the account's vault. ``current(account, slot_id)`` says
        whether a remembered slot still opens it (a stat and a small read: no thread hop);
        otherwise the blocking ``check(account, password)`` runs in a thread, and is expected
        to ``add`` the password when it opens a slot. A wrong password always pays the full
        price and is never cached."""
        digest = self._digest(password)
        if self._known(account_key, digest, current):
            return True
        # One derivation at a time per account: concurrent first logins wait here and then hit
        # the cache; it also slows a guessing client down to one guess per scrypt.
        lock = self._alocks.setdefault(account_key, asyncio.Lock())
        async with lock:
            if self._known(account_key, digest, current):
                return True
            async with self._kdf_slots:
                return await asyncio.to_thread(check, account_key, password)
