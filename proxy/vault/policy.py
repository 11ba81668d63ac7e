"""What the commands do to a vault as a whole: store a new grant (opening the vault, or making
it anew when nothing given opens it) and give an account its first local password.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..tokens.store import TokenState
from .errors import PasswordNeeded
from .format import SlotInfo
from .migrate import legacy_state
from .vault import Vault


def grant_fields(flow: str, access_token: str | None, expires_at: float | None,
                 refresh_token: str | None, now: float) -> dict[str, Any]:
    """The token state a fresh sign-in leaves (``authorize`` and the admin page alike): the
    refresh token only for the user flows, any earlier failure cleared."""
    fields: dict[str, Any] = {
        "access_token": access_token, "expires_at": expires_at, "needs_authorization": None,
        "last_error": None, "authorized_at": now, "last_refresh": now if access_token else None}
    if flow in ("authorization_code", "device_code"):
        fields["refresh_token"] = refresh_token
    return fields


def store_grant(vault: Vault, account_key: str, password: str | None,
                fields: dict[str, Any]) -> list[SlotInfo]:
    """Put new tokens (``fields`` of ``TokenState``) in the account's vault, opening it with
    ``password`` or the master key; a vault neither opens gets replaced. Returns the password
    slots that replacement made useless (empty when the vault was opened or is new).

    Raises ``PasswordNeeded`` when a vault must be made and there is neither a password nor a
    master key to seal it under."""
    opened = False
    if vault.exists(account_key):
        if password is not None and vault.open_with_password(account_key, password):
            opened = True
        elif vault.has_master_key and vault.open_with_master(account_key):
            opened = True
            if password is not None:
                vault.add_password(account_key, password,
                                   f"password-{len(vault.slots(account_key)) + 1}")
    if opened:
        vault.update(account_key, lambda s: replace(s, **fields))
        return []
    if password is None and not vault.has_master_key:
        raise PasswordNeeded(f"a local password for {account_key} is needed to encrypt its "
                             "tokens")
    others = ([s for s in vault.slots(account_key) if s.type == "password"]
              if vault.exists(account_key) else [])
    vault.create(account_key, password=password, state=replace(TokenState(), **fields))
    vault.migrate(account_key)  # clears a leftover plain store
    return others


def first_password(vault: Vault, account_key: str, password: str) -> None:
    """A new vault for an account without one, opened by ``password``: it takes over the tokens
    of the earlier plain store, whose files then go."""
    vault.create(account_key, password=password,
                 state=legacy_state(vault.state_dir, account_key))
    vault.migrate(account_key)  # the vault exists now: this clears the plain files
