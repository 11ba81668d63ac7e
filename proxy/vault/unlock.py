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

from ..tokens.keys import ScryptParams, encode_password, scrypt_key
from .errors import VaultBusy

# Different passwords of one account that may be checked or wait for it at once; more are
# refused at once (temporary), so a queue of guesses stays short in front of a real login.
MAX_WAITING = 4


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
        self._pending: dict[str, dict[bytes, int]] = {}  # account -> digest -> waiting
        self._dummy = ScryptParams.fresh()
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
            return True  # a known-good password never waits behind guesses
        # One derivation at a time per account: concurrent first logins wait here and then hit
        # the cache; it also slows a guessing client down to one guess per scrypt. Logins with
        # the same password as one already waiting join it for free; a queue of different
        # passwords (guesses) is bounded, the excess refused at once, never made to wait.
        pending = self._pending.setdefault(account_key, {})
        if digest not in pending and len(pending) >= MAX_WAITING:
            raise VaultBusy("too many logins for this account are being checked")
        pending[digest] = pending.get(digest, 0) + 1
        try:
            lock = self._alocks.setdefault(account_key, asyncio.Lock())
            async with lock:
                if self._known(account_key, digest, current):
                    return True
                async with self._kdf_slots:
                    return await asyncio.to_thread(check, account_key, password)
        finally:
            pending[digest] -= 1
            if not pending[digest]:
                del pending[digest]

    def known(self, account_key: str, password: str,
              current: Callable[[str, str], bool]) -> bool:
        """Whether ``password`` opened the account's vault in this process (no scrypt)."""
        return self._known(account_key, self._digest(password), current)

    async def dummy(self, password: str) -> None:
        """The work of checking a password against one slot, for a user without one (so a
        refusal takes as long whether or not the account exists)."""
        async with self._kdf_slots:
            await asyncio.to_thread(scrypt_key, encode_password(password), self._dummy)
