"""The vault's errors: store errors (``proxy.tokens.store``) with a message a person can act on."""

from __future__ import annotations

from ..tokens.store import StoreError, StoreLocked


class VaultError(StoreError):
    """The vault cannot do what was asked; the message says what to do."""


class VaultLocked(VaultError, StoreLocked):
    """The account's data key is not in memory: a client login (or the master key) opens it."""


class PasswordNeeded(VaultError):
    """A new vault must be made and there is neither a local password nor a master key for it."""


class VaultBusy(VaultError):
    """Too many password checks for the account are already waiting (a guessing storm)."""
