"""``Vault``: the vault files joined with the earlier store's migration and the daemon's unlock
cache; the one object the daemon, the CLI and the token manager share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from . import migrate as legacy
from .errors import VaultError
from .files import VaultFiles
from .unlock import UnlockCache

log = logging.getLogger("mailproxy.vault")


class Vault(VaultFiles):
    """``state_dir/vault/<account>.vault``; thread-safe, shared by the daemon and the CLI."""

    def __init__(self, state_dir: Path, *, master_key: bytes | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._logins = UnlockCache()
        super().__init__(state_dir, master_key=master_key, clock=clock)

    def _forget_logins(self, account_key: str, slot_id: str | None = None) -> None:
        self._logins.forget(account_key, slot_id)

    def open_with_password(self, account_key: str, password: str) -> bool:
        """Blocking (scrypt per password slot). True if the password opens the vault; a wrong
        one changes nothing anywhere."""
        got = self._read(account_key)
        if got is None:
            return self.migrate(account_key, password)
        data = got[0]
        opened = self._open_password_slot(account_key, data, password)
        if opened is not None:
            self._note_slots(account_key, got[1], data)
            self._opened(account_key, password, opened[1])
            return True
        for slot in data["slots"]:
            if slot.get("type") == "legacy" and legacy.legacy_slot_matches(slot, password):
                upgraded = self.upgrade_legacy_slot(account_key, data, password)
                if upgraded is None:
                    return False
                self._remember(account_key, data["vault_id"], upgraded[0])
                self._opened(account_key, password, upgraded[1])
                log.info("%s: migrated password now has its own key slot", account_key)
                return True
        return False

    def _opened(self, account_key: str, password: str, slot_id: str) -> None:
        self._logins.add(account_key, password, slot_id)
        try:
            self.ensure_master_slot(account_key)
        except (OSError, VaultError) as exc:
            log.warning("%s: could not add the master key slot: %s", account_key, exc)

    async def unlock(self, account_key: str, password: str) -> bool:
        """The daemon's password check: scrypt once per process and password, then an HMAC
        compare. A wrong password always pays the full price and is never cached."""
        return await self._logins.unlock(account_key, password, current=self._slot_current,
                                         check=self.open_with_password)

    def verified(self, account_key: str, password: str) -> bool:
        """Whether ``password`` already opened the account in this process (no scrypt)."""
        try:
            return self._logins.known(account_key, password, self._slot_current)
        except (OSError, ValueError):
            return False  # the full check says what is wrong

    async def dummy_check(self, password: str) -> None:
        """As long as a wrong password's check, for a user with no vault to check it with."""
        await self._logins.dummy(password)

    # -- the earlier plain store ----------------------------------------------------------------

    def has_legacy(self, account_key: str) -> bool:
        return legacy.has_legacy(self.state_dir, account_key)

    def migrate(self, account_key: str, password: str | None = None) -> bool:
        """Move the earlier plain store of the account into a new vault (``migrate.migrate``);
        True if a vault was made."""
        return legacy.migrate(self, account_key, password)
