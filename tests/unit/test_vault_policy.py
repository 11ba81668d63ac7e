"""What the commands do to a vault: store a grant (open it or make it anew), a first password."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.tokens.store import FileTokenStore, TokenState
from proxy.vault import PasswordNeeded, Vault
from proxy.vault.policy import first_password, store_grant

KEY = "alice@example.com"
MASTER = b"a master key of more than 16 bytes"
GRANT = {"refresh_token": "new-refresh-token", "access_token": None, "last_error": None}


def test_a_password_that_opens_the_vault_keeps_it(tmp_path: Path) -> None:
    Vault(tmp_path).create(KEY, password="pw", state=TokenState(refresh_token="old"))
    vault = Vault(tmp_path)
    assert store_grant(vault, KEY, "pw", GRANT) == []
    fresh = Vault(tmp_path)
    assert fresh.open_with_password(KEY, "pw")
    assert fresh.load(KEY).refresh_token == "new-refresh-token"
    assert [s.type for s in fresh.slots(KEY)] == ["password"]


def test_the_master_key_opens_it_and_a_new_password_gets_a_slot(tmp_path: Path) -> None:
    Vault(tmp_path, master_key=MASTER).create(KEY, password="pw")
    vault = Vault(tmp_path, master_key=MASTER)
    assert store_grant(vault, KEY, "other pw", GRANT) == []
    assert [s.label for s in vault.slots(KEY)] == ["default", "master key", "password-3"]
    fresh = Vault(tmp_path)
    assert fresh.open_with_password(KEY, "pw") and fresh.open_with_password(KEY, "other pw")
    assert fresh.load(KEY).refresh_token == "new-refresh-token"


def test_a_vault_nothing_opens_is_made_anew_and_says_what_stopped_working(
        tmp_path: Path) -> None:
    Vault(tmp_path).create(KEY, password="pw")
    lost = store_grant(Vault(tmp_path), KEY, "forgotten", GRANT)
    assert [s.label for s in lost] == ["default"]
    fresh = Vault(tmp_path)
    assert not fresh.open_with_password(KEY, "pw")
    assert fresh.open_with_password(KEY, "forgotten")
    assert fresh.load(KEY).refresh_token == "new-refresh-token"


def test_a_new_vault_needs_a_password_or_a_master_key(tmp_path: Path) -> None:
    with pytest.raises(PasswordNeeded):
        store_grant(Vault(tmp_path), KEY, None, GRANT)
    assert not Vault(tmp_path).exists(KEY)
    assert store_grant(Vault(tmp_path, master_key=MASTER), KEY, None, GRANT) == []
    assert Vault(tmp_path, master_key=MASTER).load(KEY).refresh_token == "new-refresh-token"


def test_first_password_carries_the_plain_store_and_clears_it(tmp_path: Path) -> None:
    FileTokenStore(tmp_path).save(KEY, TokenState(refresh_token="plain-store-token"))
    vault = Vault(tmp_path)
    assert vault.has_legacy(KEY)
    first_password(vault, KEY, "pw")
    assert not vault.has_legacy(KEY)
    fresh = Vault(tmp_path)
    assert fresh.open_with_password(KEY, "pw")
    assert fresh.load(KEY).refresh_token == "plain-store-token"
