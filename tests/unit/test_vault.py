"""The token vault: key slots, what a wrong password may not do, the file on disk, migration."""

from __future__ import annotations

import asyncio
import hashlib
import json
import stat
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from proxy.tokens.keys import MasterKeyError, load_master_key
from proxy.tokens.store import FileTokenStore, TokenState, atomic_write, ensure_private_dir
from proxy.vault import Vault, VaultError, VaultLocked
from proxy.vault.migrate import hash_password

KEY = "alice@example.com"
RT = "refresh-token-0123456789-abcdefghij"
AT = "access-token-9876543210-zyxwvutsrq"
MASTER = b"YSBtYXN0ZXIga2V5IG9mIG1vcmUgdGhhbiAxNiBieXRlcw8x"  # base64: 35 bytes


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts hashlib.scrypt calls, noting the thread each ran in."""
    calls: list[str] = []
    real: Callable[..., bytes] = hashlib.scrypt

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    return calls


def tree(state_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(state_dir)): p.read_bytes()
            for p in sorted(state_dir.rglob("*")) if p.is_file()}


def make(tmp_path: Path, *passwords: str, master: bytes | None = None) -> Vault:
    vault = Vault(tmp_path, master_key=master)
    vault.create(KEY, password=passwords[0] if passwords else None,
                 state=TokenState(refresh_token=RT, access_token=AT, expires_at=1e10))
    for i, pw in enumerate(passwords[1:], 2):
        vault.add_password(KEY, pw, f"device-{i}")
    return vault


def test_two_passwords_open_the_same_tokens_and_one_can_go(tmp_path: Path) -> None:
    make(tmp_path, "laptop pw", "phone pw")
    for pw in ("laptop pw", "phone pw"):
        vault = Vault(tmp_path)
        assert vault.load(KEY).locked
        assert vault.open_with_password(KEY, pw)
        state = vault.load(KEY)
        assert (state.refresh_token, state.access_token, state.locked) == (RT, AT, False)
    vault = Vault(tmp_path)
    assert vault.open_with_password(KEY, "phone pw")
    assert [s.label for s in vault.slots(KEY)] == ["default", "device-2"]
    vault.remove_slot(KEY, "default")
    assert not Vault(tmp_path).open_with_password(KEY, "laptop pw")
    fresh = Vault(tmp_path)
    assert fresh.open_with_password(KEY, "phone pw")
    assert fresh.load(KEY).refresh_token == RT
    with pytest.raises(VaultError, match="last password"):
        fresh.remove_slot(KEY, "device-2")


def test_wrong_password_changes_no_byte(tmp_path: Path) -> None:
    make(tmp_path, "right", master=None)
    before = tree(tmp_path)
    vault = Vault(tmp_path)
    for wrong in ("wrong", "", "right ", "RIGHT"):
        assert not vault.open_with_password(KEY, wrong)
        assert not asyncio.run(vault.unlock(KEY, wrong))
    assert vault.load(KEY).locked
    with pytest.raises(VaultLocked):
        vault.update(KEY, lambda s: replace(s, last_error="x"))
    with pytest.raises(VaultLocked):
        vault.add_password(KEY, "another", "x")
    with pytest.raises(VaultLocked):
        vault.remove_slot(KEY, "default")
    assert tree(tmp_path) == before


def test_no_secret_in_any_file_and_private_modes(tmp_path: Path) -> None:
    vault = make(tmp_path, "local pw one", "local pw two", master=MASTER)
    vault.update(KEY, lambda s: replace(s, refresh_token=RT + "-rotated"))
    files = tree(tmp_path)
    assert files
    for name, data in files.items():
        for secret in (RT, AT, "local pw one", "local pw two", MASTER.decode()):
            assert secret.encode() not in data, (name, secret)
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "vault").stat().st_mode) == 0o700
    data = json.loads(vault.path(KEY).read_bytes())
    assert data["meta"]["has_refresh_token"] is True
    assert set(data["meta"]) <= {"created", "updated", "expires_at", "last_refresh",
                                 "authorized_at", "needs_authorization", "last_error",
                                 "has_refresh_token", "notified"}


def test_tampered_or_moved_ciphertext_does_not_open(tmp_path: Path) -> None:
    vault = make(tmp_path, "pw")
    data = json.loads(vault.path(KEY).read_bytes())
    ct = bytearray(data["tokens"]["ciphertext"].encode())
    ct[5] = ord("A") if ct[5] != ord("A") else ord("B")
    data["tokens"]["ciphertext"] = ct.decode()
    vault.path(KEY).write_text(json.dumps(data))
    fresh = Vault(tmp_path)
    assert fresh.open_with_password(KEY, "pw")  # the slot is intact
    with pytest.raises(ValueError, match="do not decrypt"):
        fresh.load(KEY)
    # A file copied to another account's name is refused (the account is bound in).
    other = make(tmp_path / "b", "pw")
    bob = "bob@example.com"
    ensure_private_dir(other.path(bob).parent)
    other.path(bob).write_bytes(other.path(KEY).read_bytes())
    with pytest.raises(ValueError, match="belongs to account"):
        Vault(tmp_path / "b").load(bob)


async def test_scrypt_once_per_process_and_wrong_never_cached(
        tmp_path: Path, scrypt_calls: list[str]) -> None:
    make(tmp_path, "pw")
    vault = Vault(tmp_path)
    scrypt_calls.clear()
    assert await vault.unlock(KEY, "pw")
    assert len(scrypt_calls) == 1 and scrypt_calls[0] != threading.current_thread().name
    for _ in range(5):
        assert await vault.unlock(KEY, "pw")
    assert len(scrypt_calls) == 1
    for _ in range(3):
        assert not await vault.unlock(KEY, "nope")
    assert len(scrypt_calls) == 4


async def test_concurrent_first_logins_pay_once(tmp_path: Path, scrypt_calls: list[str]) -> None:
    make(tmp_path, "pw")
    vault = Vault(tmp_path)
    scrypt_calls.clear()
    assert all(await asyncio.gather(*(vault.unlock(KEY, "pw") for _ in range(20))))
    assert len(scrypt_calls) == 1


async def test_removed_password_stops_working_in_a_running_daemon(tmp_path: Path) -> None:
    make(tmp_path, "pw1", "pw2")
    daemon = Vault(tmp_path)
    assert await daemon.unlock(KEY, "pw1")
    cli = Vault(tmp_path)
    assert cli.open_with_password(KEY, "pw2")
    cli.remove_slot(KEY, "default")  # pw1, from another process
    assert not await daemon.unlock(KEY, "pw1")
    assert await daemon.unlock(KEY, "pw2")


def test_recreated_vault_locks_the_old_data_key_out(tmp_path: Path) -> None:
    make(tmp_path, "pw")
    daemon = Vault(tmp_path)
    assert daemon.open_with_password(KEY, "pw")
    assert daemon.load(KEY).refresh_token == RT
    # `mailproxy authorize` with a password that opens nothing makes a new vault.
    Vault(tmp_path).create(KEY, password="new pw", state=TokenState(refresh_token="rt2-xxxxxxxx"))
    state = daemon.load(KEY)
    assert state.locked and state.refresh_token is None
    assert daemon.open_with_password(KEY, "new pw")
    assert daemon.load(KEY).refresh_token == "rt2-xxxxxxxx"


def test_master_slot_opens_without_a_password(tmp_path: Path) -> None:
    make(tmp_path, "pw", master=MASTER)
    assert Vault(tmp_path, master_key=MASTER).load(KEY).refresh_token == RT
    assert Vault(tmp_path, master_key=b"some other master key!!").load(KEY).locked
    assert Vault(tmp_path).load(KEY).locked


def test_master_slot_added_at_first_password_login(tmp_path: Path) -> None:
    make(tmp_path, "pw")  # made before a master key was configured
    assert not Vault(tmp_path, master_key=MASTER).open_with_master(KEY)
    vault = Vault(tmp_path, master_key=MASTER)
    assert vault.open_with_password(KEY, "pw")
    assert [s.type for s in vault.slots(KEY)] == ["password", "master"]
    assert Vault(tmp_path, master_key=MASTER).open_with_master(KEY)


def test_mark_notified_once_and_while_locked(tmp_path: Path) -> None:
    make(tmp_path, "pw")
    locked = Vault(tmp_path)
    assert locked.mark_notified(KEY, "deadline_approaching:123")
    assert not locked.mark_notified(KEY, "deadline_approaching:123")
    assert locked.mark_notified(KEY, "authorization_required:abc")
    assert set(locked.meta(KEY)["notified"]) == {"deadline_approaching:123",
                                                 "authorization_required:abc"}
    opened = Vault(tmp_path)
    assert opened.open_with_password(KEY, "pw")
    assert opened.load(KEY).refresh_token == RT  # meta changes leave the tokens intact


def write_legacy(state_dir: Path, password: str) -> None:
    FileTokenStore(state_dir).save(KEY, TokenState(refresh_token=RT, access_token=AT,
                                                   expires_at=1e10, last_refresh=5.0))
    ensure_private_dir(state_dir / "passwords")
    atomic_write(state_dir / "passwords" / f"{KEY}.scrypt",
                 (hash_password(password) + "\n").encode())


def test_migration_at_first_login_without_master_key(tmp_path: Path) -> None:
    write_legacy(tmp_path, "old pw")
    vault = Vault(tmp_path)
    assert not vault.migrate(KEY)  # nothing to encrypt with yet
    assert not vault.open_with_password(KEY, "wrong")
    assert (tmp_path / "tokens" / f"{KEY}.json").exists()
    assert vault.open_with_password(KEY, "old pw")
    assert not (tmp_path / "tokens" / f"{KEY}.json").exists()
    assert not (tmp_path / "passwords" / f"{KEY}.scrypt").exists()
    state = Vault(tmp_path).load(KEY)
    assert state.locked
    fresh = Vault(tmp_path)
    assert fresh.open_with_password(KEY, "old pw")
    state = fresh.load(KEY)
    assert (state.refresh_token, state.access_token, state.last_refresh) == (RT, AT, 5.0)
    assert not any(RT.encode() in data for data in tree(tmp_path).values())


def test_migration_at_start_with_master_key(tmp_path: Path) -> None:
    write_legacy(tmp_path, "old pw")
    assert Vault(tmp_path, master_key=MASTER).migrate(KEY)
    assert not any(RT.encode() in data for data in tree(tmp_path).values())
    assert Vault(tmp_path, master_key=MASTER).load(KEY).refresh_token == RT
    assert [s.type for s in Vault(tmp_path).slots(KEY)] == ["legacy", "master"]
    # The old password still logs in, and then gets a real slot.
    vault = Vault(tmp_path, master_key=MASTER)
    assert not vault.open_with_password(KEY, "wrong")
    assert vault.open_with_password(KEY, "old pw")
    assert sorted(s.type for s in vault.slots(KEY)) == ["master", "password"]
    assert Vault(tmp_path).open_with_password(KEY, "old pw")


def test_master_key_sources(tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    key_file.write_bytes(MASTER + b"\n")
    key_file.chmod(0o600)
    assert load_master_key(f"file:{key_file}") == MASTER
    key_file.chmod(0o640)
    with pytest.raises(MasterKeyError, match=r"readable by others.*chmod 600"):
        load_master_key(f"file:{key_file}")
    with pytest.raises(MasterKeyError, match="cannot read"):
        load_master_key(f"file:{tmp_path / 'missing'}")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mailproxy").write_bytes(MASTER)
    (creds / "mailproxy").chmod(0o400)
    assert load_master_key("credential:mailproxy",
                           {"CREDENTIALS_DIRECTORY": str(creds)}) == MASTER
    with pytest.raises(MasterKeyError, match="LoadCredential"):
        load_master_key("credential:mailproxy", {})
    assert load_master_key("env:MK", {"MK": MASTER.decode()}) == MASTER
    with pytest.raises(MasterKeyError, match="not set"):
        load_master_key("env:MK", {})
    with pytest.raises(MasterKeyError, match="too short"):
        load_master_key("env:MK", {"MK": "short"})
    # Issue 12: at least 32 random bytes' worth, whatever the encoding.
    for weak in ("a master key of more than 16 bytes", "x" * 200, "ab12" * 15,
                 "correcthorsebatterystaplecorrecthorsebattery"):
        with pytest.raises(MasterKeyError, match="too short or too guessable"):
            load_master_key("env:MK", {"MK": weak})
    for strong in ("0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9",
                   "Q7neZnJZqwKxhu5TllHnf091+QJUMEwV3S1MdttUH14=",
                   "FONIBYq0et3-BwtUTgbZLvOnINHO3iS7wAkdB96Da0A"):
        assert load_master_key("env:MK", {"MK": strong}) == strong.encode()
