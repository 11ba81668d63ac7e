"""The earlier plain store (``tokens/<account>.json`` and ``passwords/<account>.scrypt`` under the
state directory) and its move into a vault; its password hash only verifies, it never encrypts.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
from pathlib import Path
from typing import Any

from ..tokens.keys import ScryptParams, b64d, b64e, scrypt_key
from ..tokens.store import FileTokenStore, TokenState, safe_name
from .files import VaultFiles

log = logging.getLogger("mailproxy.vault")


# -- the earlier store's password hashes ---------------------------------------------------------


def legacy_encode(password: str) -> bytes:
    # The earlier store did not normalize: surrogateescape only.
    return password.encode("utf-8", "surrogateescape")


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt_b64$hash_b64``, as the earlier store wrote it (for tests)."""
    params = ScryptParams.fresh()
    digest = scrypt_key(legacy_encode(password), params)
    return f"scrypt${params.n}${params.r}${params.p}${b64e(params.salt)}${b64e(digest)}"


def check_password(stored: str, secret: bytes) -> bool:
    """Slow: runs scrypt. Raises ValueError if ``stored`` is not such a hash."""
    parts = stored.strip().split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not a scrypt$n$r$p$salt$hash string")
    try:
        n, r, p = (int(x) for x in parts[1:4])
    except ValueError:
        raise ValueError("malformed number") from None
    expected = b64d(parts[5])
    if not expected:
        raise ValueError("empty hash")
    return hmac.compare_digest(scrypt_key(secret, ScryptParams(n, r, p, b64d(parts[4]))),
                               expected)


def legacy_slot_matches(slot: dict[str, Any], password: str) -> bool:
    """Whether ``password`` is the one a migrated vault's legacy slot verifies."""
    try:
        return check_password(str(slot.get("hash", "")), legacy_encode(password))
    except ValueError:
        return False


# -- the earlier store's files -------------------------------------------------------------------


def legacy_paths(state_dir: Path, account_key: str) -> tuple[Path, Path]:
    return (state_dir / "tokens" / safe_name(account_key, ".json"),
            state_dir / "passwords" / safe_name(account_key, ".scrypt"))


def has_legacy(state_dir: Path, account_key: str) -> bool:
    return any(p.exists() for p in legacy_paths(state_dir, account_key))


def legacy_state(state_dir: Path, account_key: str) -> TokenState | None:
    """The tokens of the earlier plain store, to carry into a new vault; None without one."""
    if not has_legacy(state_dir, account_key):
        return None
    return FileTokenStore(state_dir).load(account_key)


def migrate(vault: VaultFiles, account_key: str, password: str | None = None) -> bool:
    """Move the earlier plain token file (and password hash) into a new vault: under the
    master key at start-up, or under ``password`` once a client logged in with it (the
    old hash only verifies a password, it cannot encrypt). True if a vault was made."""
    tokens_path, hash_path = legacy_paths(vault.state_dir, account_key)
    if not tokens_path.exists() and not hash_path.exists():
        return False
    with vault.locked(account_key):
        if vault.exists(account_key):
            # A crash after the vault was written, before the clean-up: finish it.
            _remove_legacy(vault.state_dir, account_key)
            return False
        state = FileTokenStore(vault.state_dir).load(account_key)
        old_hash = hash_path.read_text("ascii").strip() if hash_path.exists() else None
    if password is not None:
        try:
            if old_hash is None or not check_password(old_hash, legacy_encode(password)):
                return False
        except ValueError:
            return False
        vault.create(account_key, password=password, state=state)
    elif vault.has_master_key:
        vault.create(account_key, password=None, state=state, legacy_hash=old_hash)
    else:
        return False
    with vault.locked(account_key):
        _remove_legacy(vault.state_dir, account_key)
    log.info("%s: tokens moved from the plain store into the encrypted vault", account_key)
    return True


def _remove_legacy(state_dir: Path, account_key: str) -> None:
    for path in legacy_paths(state_dir, account_key):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.with_name(safe_name(account_key, ".lock")))
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
