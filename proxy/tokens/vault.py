"""The encrypted token vault: one file per account, tokens sealed with AES-GCM under a random
data key, the data key wrapped in key slots as disk encryption does it.

* A password slot wraps the data key under scrypt(password): an account may have several local
  passwords (one per client or device), and one changes without re-authorizing.
* A master slot wraps it under a key from ``[vault] master_key``; with it the daemon opens every
  vault at start-up and refreshes in the background before any client logs in.
* Without a master key an account's vault opens at its first successful client login; the data
  key then stays in this process's memory only.

The vault is a ``TokenStore``: the token manager reads and writes through it and sees a locked
account as ``TokenState(locked=True)``. Only the tokens are secret; the rest of the state
(expiry, last refresh, errors, notifications) stays readable without a key, for ``status``.
Every write is a read-modify-write of the whole file under an flock, written atomically.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .keys import (
    ScryptParams,
    b64d,
    b64e,
    encode_password,
    master_slot_key,
    new_key,
    scrypt_key,
    seal,
    unseal,
)
from .store import (
    Stamp,
    StoreError,
    StoreLocked,
    TokenState,
    account_lock,
    atomic_write,
    ensure_private_dir,
    file_stamp,
    read_file,
    safe_name,
)

log = logging.getLogger("mailproxy.vault")

FORMAT = "mailproxy-vault/1"
SlotType = Literal["password", "master", "legacy"]
_META_NUMBERS = ("expires_at", "last_refresh", "authorized_at")
_META_TEXTS = ("needs_authorization", "last_error")


class VaultError(StoreError):
    """The vault cannot do what was asked; the message says what to do."""


class VaultLocked(VaultError, StoreLocked):
    """The account's data key is not in memory: a client login (or the master key) opens it."""


@dataclass(frozen=True)
class SlotInfo:
    id: str
    type: SlotType
    label: str
    created: float


@dataclass(frozen=True)
class _Open:
    vault_id: str
    data_key: bytes


def _aad(kind: str, account_key: str, vault_id: str, slot_id: str = "") -> bytes:
    # Binds each ciphertext to its account, vault and slot: a blob copied from another file
    # does not open.
    return "\0".join((FORMAT, kind, account_key, vault_id, slot_id)).encode()


def _parse(raw: bytes, account_key: str) -> dict[str, Any]:
    data = json.loads(raw)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    if data.get("account") != account_key:
        raise ValueError(f"belongs to account {data.get('account')!r}")
    if not isinstance(data.get("vault_id"), str) or not isinstance(data.get("slots"), list):
        raise ValueError("vault_id or slots missing")
    if not isinstance(data.setdefault("meta", {}), dict):
        raise ValueError("meta is not an object")
    return data


def _slot_info(slot: dict[str, Any]) -> SlotInfo:
    return SlotInfo(str(slot.get("id")), slot.get("type", "password"), str(slot.get("label", "")),
                    float(slot.get("created", 0.0)))


def _state_from(data: dict[str, Any], tokens: dict[str, Any] | None) -> TokenState:
    meta = data["meta"]
    values: dict[str, Any] = {}
    for name in _META_NUMBERS:
        value = meta.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            values[name] = float(value)
    for name in _META_TEXTS:
        if isinstance(meta.get(name), str):
            values[name] = meta[name]
    if tokens is None:
        return TokenState(locked=True, **values)
    return TokenState(refresh_token=tokens.get("refresh_token") or None,
                      access_token=tokens.get("access_token") or None, **values)


class Vault:
    """``state_dir/vault/<account>.vault``; thread-safe, shared by the daemon and the CLI."""

    def __init__(self, state_dir: Path, *, master_key: bytes | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.state_dir = Path(state_dir)
        self._dir = self.state_dir / "vault"
        self._master = master_key
        self._clock = clock
        self._open: dict[str, _Open] = {}
        # Logins already verified in this process: HMAC(process key, password) -> slot id.
        self._proc_key = secrets.token_bytes(32)
        self._good: dict[str, dict[bytes, str]] = {}
        self._seen: dict[str, Stamp | None] = {}
        self._mutex = threading.Lock()
        self._alocks: dict[str, asyncio.Lock] = {}
        # Each scrypt holds 32 MiB: bound how many run at once across accounts.
        self._kdf_slots = asyncio.Semaphore(os.cpu_count() or 1)

    @property
    def has_master_key(self) -> bool:
        return self._master is not None

    def path(self, account_key: str) -> Path:
        return self._dir / safe_name(account_key, ".vault")

    # -- reading --------------------------------------------------------------------------------

    def _read(self, account_key: str) -> tuple[dict[str, Any], Stamp] | None:
        got = read_file(self.path(account_key))
        if got is None:
            return None
        raw, stamp = got
        try:
            return _parse(raw, account_key), stamp
        except (ValueError, TypeError) as exc:  # JSON and Unicode errors are ValueErrors
            raise ValueError(f"{self.path(account_key)}: not a usable vault file: {exc}") from None

    def exists(self, account_key: str) -> bool:
        return file_stamp(self.path(account_key)) is not None

    def slots(self, account_key: str) -> list[SlotInfo]:
        got = self._read(account_key)
        return [] if got is None else [_slot_info(s) for s in got[0]["slots"]]

    def meta(self, account_key: str) -> dict[str, Any]:
        """The state anyone with read access may see (no tokens), for ``status``."""
        got = self._read(account_key)
        return {} if got is None else dict(got[0]["meta"])

    def is_open(self, account_key: str) -> bool:
        return account_key in self._open

    def _data_key(self, account_key: str, data: dict[str, Any]) -> bytes | None:
        """The data key for this version of the file, from memory or the master slot."""
        with self._mutex:
            known = self._open.get(account_key)
            if known is not None and known.vault_id != data["vault_id"]:
                # Re-created by `authorize` under a new data key: the old one opens nothing.
                del self._open[account_key]
                self._good.pop(account_key, None)
                known = None
        if known is not None:
            return known.data_key
        if self._master is None:
            return None
        for slot in data["slots"]:
            if slot.get("type") == "master":
                key = self._unwrap(account_key, data, slot,
                                   master_slot_key(self._master, b64d(slot["salt"])))
                if key is not None:
                    self._remember(account_key, data["vault_id"], key)
                    return key
        return None

    def _unwrap(self, account_key: str, data: dict[str, Any], slot: dict[str, Any],
                kek: bytes) -> bytes | None:
        try:
            return unseal(kek, b64d(slot["nonce"]), b64d(slot["wrapped"]),
                          _aad("slot", account_key, data["vault_id"], str(slot["id"])))
        except (KeyError, ValueError):
            return None

    def _remember(self, account_key: str, vault_id: str, key: bytes) -> None:
        with self._mutex:
            self._open[account_key] = _Open(vault_id, key)

    def _tokens(self, account_key: str, data: dict[str, Any], key: bytes) -> dict[str, Any]:
        sealed = data.get("tokens")
        if sealed is None:
            return {}
        plain = unseal(key, b64d(sealed.get("nonce")), b64d(sealed.get("ciphertext")),
                       _aad("tokens", account_key, data["vault_id"]))
        if plain is None:
            raise ValueError(f"{self.path(account_key)}: the tokens do not decrypt (damaged file)")
        tokens = json.loads(plain)
        if not isinstance(tokens, dict):
            raise ValueError(f"{self.path(account_key)}: sealed tokens are not an object")
        return tokens

    # -- TokenStore -----------------------------------------------------------------------------

    def load(self, account_key: str) -> TokenState:
        got = self._read(account_key)
        if got is None:
            self._seen[account_key] = None
            return TokenState()  # not authorized yet
        data, stamp = got
        key = self._data_key(account_key, data)
        tokens = None if key is None else self._tokens(account_key, data, key)
        self._seen[account_key] = stamp
        return _state_from(data, tokens)

    def save(self, account_key: str, state: TokenState) -> None:
        self.update(account_key, lambda _: state)

    def update(self, account_key: str, fn: Callable[[TokenState], TokenState]) -> TokenState:
        with self._locked(account_key):
            got = self._read(account_key)
            if got is None:
                raise VaultLocked(f"account {account_key} has no vault yet")
            data, _ = got
            key = self._data_key(account_key, data)
            if key is None:
                raise VaultLocked(f"the vault of {account_key} is locked")
            old = _state_from(data, self._tokens(account_key, data, key))
            new = fn(old)
            if new != old:
                self._write_state(account_key, data, key, new)
            return new

    def changed(self, account_key: str) -> bool:
        if account_key not in self._seen:
            return True
        return file_stamp(self.path(account_key)) != self._seen[account_key]

    def _write_state(self, account_key: str, data: dict[str, Any], key: bytes,
                     state: TokenState) -> None:
        meta = dict(data["meta"])
        for name in (*_META_NUMBERS, *_META_TEXTS):
            meta[name] = getattr(state, name)
        meta["has_refresh_token"] = bool(state.refresh_token)
        meta["updated"] = self._clock()
        plain = json.dumps({"refresh_token": state.refresh_token,
                            "access_token": state.access_token}).encode()
        nonce, ciphertext = seal(key, plain, _aad("tokens", account_key, data["vault_id"]))
        self._write(account_key, {**data, "meta": meta,
                                  "tokens": {"nonce": b64e(nonce), "ciphertext": b64e(ciphertext)}})

    def _write(self, account_key: str, data: dict[str, Any]) -> None:
        ensure_private_dir(self._dir)
        raw = (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
        self._seen[account_key] = atomic_write(self.path(account_key), raw)

    def _locked(self, account_key: str) -> contextlib.AbstractContextManager[None]:
        return account_lock(self._dir, account_key)

    # -- creating and changing slots (blocking: CLI, or a thread in the daemon) -----------------

    def _password_slot(self, account_key: str, vault_id: str, key: bytes, password: str,
                       label: str) -> dict[str, Any]:
        params = ScryptParams.fresh()
        slot_id = "p-" + secrets.token_hex(4)
        nonce, wrapped = seal(scrypt_key(encode_password(password), params), key,
                              _aad("slot", account_key, vault_id, slot_id))
        return {"id": slot_id, "type": "password", "label": label, "created": self._clock(),
                "kdf": {"name": "scrypt", "n": params.n, "r": params.r, "p": params.p,
                        "salt": b64e(params.salt)},
                "nonce": b64e(nonce), "wrapped": b64e(wrapped)}

    def _master_slot(self, account_key: str, vault_id: str, key: bytes) -> dict[str, Any]:
        assert self._master is not None
        salt = secrets.token_bytes(16)
        nonce, wrapped = seal(master_slot_key(self._master, salt), key,
                              _aad("slot", account_key, vault_id, "master"))
        return {"id": "master", "type": "master", "label": "master key",
                "created": self._clock(), "salt": b64e(salt), "nonce": b64e(nonce),
                "wrapped": b64e(wrapped)}

    def create(self, account_key: str, *, password: str | None, label: str = "default",
               state: TokenState | None = None, legacy_hash: str | None = None) -> None:
        """A new vault under a new data key (replacing any old one): slots for ``password``
        and the master key, holding ``state``. Opens it in this process."""
        if password is None and self._master is None:
            raise VaultError("a new vault needs a local password or a master key")
        vault_id, key = secrets.token_hex(8), new_key()
        slots = []
        if password is not None:
            slots.append(self._password_slot(account_key, vault_id, key, password, label))
        if legacy_hash is not None:
            slots.append({"id": "legacy", "type": "legacy", "label": "migrated password",
                          "created": self._clock(), "hash": legacy_hash})
        if self._master is not None:
            slots.append(self._master_slot(account_key, vault_id, key))
        data = {"format": FORMAT, "account": account_key, "vault_id": vault_id,
                "slots": slots, "meta": {"created": self._clock()}}
        with self._locked(account_key):
            self._write_state(account_key, data, key, state or TokenState())
            self._remember(account_key, vault_id, key)
            self._good.pop(account_key, None)

    def _modify(self, account_key: str,
                fn: Callable[[dict[str, Any], bytes | None], dict[str, Any] | None]) -> None:
        with self._locked(account_key):
            got = self._read(account_key)
            if got is None:
                raise VaultError(f"account {account_key} has no vault yet")
            data = got[0]
            new = fn(data, self._data_key(account_key, data))
            if new is not None:
                self._write(account_key, new)

    def add_password(self, account_key: str, password: str, label: str) -> SlotInfo:
        """Needs the vault open (a password or the master key opened it in this process)."""
        added: list[dict[str, Any]] = []

        def apply(data: dict[str, Any], key: bytes | None) -> dict[str, Any]:
            if key is None:
                raise VaultLocked(f"the vault of {account_key} is locked")
            if any(s.get("label") == label for s in data["slots"]):
                raise VaultError(f"account {account_key} already has a password labelled "
                                 f"{label!r}; choose another --label or remove that one first")
            added.append(self._password_slot(account_key, data["vault_id"], key, password, label))
            return {**data, "slots": [*data["slots"], *added]}

        self._modify(account_key, apply)
        return _slot_info(added[0])

    def replace_passwords(self, account_key: str, password: str, label: str = "default") -> None:
        """All password slots become this one password (``password set``)."""
        def apply(data: dict[str, Any], key: bytes | None) -> dict[str, Any]:
            if key is None:
                raise VaultLocked(f"the vault of {account_key} is locked")
            kept = [s for s in data["slots"] if s.get("type") == "master"]
            slot = self._password_slot(account_key, data["vault_id"], key, password, label)
            return {**data, "slots": [slot, *kept]}

        self._modify(account_key, apply)
        self._good.pop(account_key, None)

    def remove_slot(self, account_key: str, name: str) -> SlotInfo:
        """Remove the password slot with this label or id. The last password slot is refused
        unless a master slot keeps the vault openable."""
        removed: list[dict[str, Any]] = []

        def apply(data: dict[str, Any], key: bytes | None) -> dict[str, Any]:
            if key is None:
                raise VaultLocked(f"the vault of {account_key} is locked")
            slots = data["slots"]
            match = [s for s in slots if s.get("type") != "master"
                     and name in (s.get("label"), s.get("id"))]
            if not match:
                labels = ", ".join(repr(s.get("label")) for s in slots
                                   if s.get("type") != "master") or "none"
                raise VaultError(f"account {account_key} has no password labelled {name!r} "
                                 f"(passwords: {labels})")
            rest = [s for s in slots if s is not match[0]]
            if not any(s.get("type") in ("password", "master") for s in rest):
                raise VaultError(f"{name!r} is the last password of {account_key}: removing it "
                                 "would leave a vault nobody can open; add another one first "
                                 "(`mailproxy password add`)")
            removed.append(match[0])
            return {**data, "slots": rest}

        self._modify(account_key, apply)
        with self._mutex:
            good = self._good.get(account_key, {})
            for digest in [d for d, sid in good.items() if sid == removed[0].get("id")]:
                del good[digest]
        return _slot_info(removed[0])

    def ensure_master_slot(self, account_key: str) -> bool:
        """Add (or repair) the master slot of an open vault when a master key is configured;
        True if the file changed."""
        if self._master is None:
            return False
        changed: list[bool] = []

        def apply(data: dict[str, Any], key: bytes | None) -> dict[str, Any] | None:
            known = self._open.get(account_key)
            key = key or (known.data_key if known and known.vault_id == data["vault_id"]
                          else None)
            if key is None:
                return None
            assert self._master is not None
            for slot in data["slots"]:
                if slot.get("type") == "master" and self._unwrap(
                        account_key, data, slot,
                        master_slot_key(self._master, b64d(slot["salt"]))) == key:
                    return None
            others = [s for s in data["slots"] if s.get("type") != "master"]
            changed.append(True)
            return {**data, "slots": [*others,
                                      self._master_slot(account_key, data["vault_id"], key)]}

        self._modify(account_key, apply)
        return bool(changed)

    def mark_notified(self, account_key: str, event_key: str) -> bool:
        """Record that a notification was sent; False if it already was (once per event)."""
        fresh: list[bool] = []

        def apply(data: dict[str, Any], key: bytes | None) -> dict[str, Any] | None:
            sent = dict(data["meta"].get("notified") or {})
            if event_key in sent:
                return None
            sent[event_key] = self._clock()
            fresh.append(True)
            return {**data, "meta": {**data["meta"], "notified": sent}}

        self._modify(account_key, apply)
        return bool(fresh)

    # -- opening with a password ----------------------------------------------------------------

    def open_with_password(self, account_key: str, password: str) -> bool:
        """Blocking (scrypt per password slot). True if the password opens the vault; a wrong
        one changes nothing anywhere."""
        got = self._read(account_key)
        if got is None:
            return self.migrate(account_key, password)
        data = got[0]
        secret = encode_password(password)
        for slot in data["slots"]:
            if slot.get("type") != "password":
                continue
            kdf = slot.get("kdf") or {}
            try:
                params = ScryptParams(int(kdf["n"]), int(kdf["r"]), int(kdf["p"]),
                                      b64d(kdf["salt"]))
                kek = scrypt_key(secret, params)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("%s: unusable password slot %s: %s", account_key, slot.get("id"), exc)
                continue
            key = self._unwrap(account_key, data, slot, kek)
            if key is not None:
                self._opened(account_key, data["vault_id"], key, secret, str(slot["id"]))
                return True
        for slot in data["slots"]:
            if slot.get("type") == "legacy" and self._legacy_matches(slot, password):
                return self._upgrade_legacy(account_key, data, password, secret)
        return False

    def _opened(self, account_key: str, vault_id: str, key: bytes, secret: bytes,
                slot_id: str) -> None:
        self._remember(account_key, vault_id, key)
        digest = hmac.new(self._proc_key, secret, hashlib.sha256).digest()
        with self._mutex:
            self._good.setdefault(account_key, {})[digest] = slot_id
        try:
            self.ensure_master_slot(account_key)
        except (OSError, VaultError) as exc:
            log.warning("%s: could not add the master key slot: %s", account_key, exc)

    @staticmethod
    def _legacy_matches(slot: dict[str, Any], password: str) -> bool:
        from ..passwords import check_password, legacy_encode  # the earlier store's format

        try:
            return check_password(str(slot.get("hash", "")), legacy_encode(password))
        except ValueError:
            return False

    def _upgrade_legacy(self, account_key: str, data: dict[str, Any], password: str,
                        secret: bytes) -> bool:
        # Migrated under the master key with the old password hash as a verifier: now that the
        # password is known, it gets a real slot.
        key = self._data_key(account_key, data)
        if key is None:
            log.warning("%s: the migrated vault needs the master key it was created with",
                        account_key)
            return False

        def apply(current: dict[str, Any], _: bytes | None) -> dict[str, Any]:
            slot = self._password_slot(account_key, current["vault_id"], key, password,
                                       "default")
            others = [s for s in current["slots"] if s.get("type") != "legacy"]
            return {**current, "slots": [slot, *others]}

        self._modify(account_key, apply)
        got = self._read(account_key)
        slot_id = got[0]["slots"][0]["id"] if got else "?"
        self._opened(account_key, data["vault_id"], key, secret, str(slot_id))
        log.info("%s: migrated password now has its own key slot", account_key)
        return True

    def _known_good(self, account_key: str, digest: bytes) -> bool:
        with self._mutex:
            slot_id = self._good.get(account_key, {}).get(digest)
            known = self._open.get(account_key)
        if slot_id is None or known is None:
            return False
        got = self._read(account_key)
        if got is None or got[0]["vault_id"] != known.vault_id or not any(
                s.get("id") == slot_id for s in got[0]["slots"]):
            # Removed (`password remove`) or the vault was re-created: check from scratch.
            with self._mutex:
                self._good.get(account_key, {}).pop(digest, None)
            return False
        return True

    async def unlock(self, account_key: str, password: str) -> bool:
        """The daemon's password check: scrypt once per process and password, then an HMAC
        compare. A wrong password always pays the full price and is never cached."""
        digest = hmac.new(self._proc_key, encode_password(password), hashlib.sha256).digest()
        if self._known_good(account_key, digest):  # a stat and a small read: no thread hop
            return True
        # One derivation at a time per account: concurrent first logins wait here and then hit
        # the cache; it also slows a guessing client down to one guess per scrypt.
        lock = self._alocks.setdefault(account_key, asyncio.Lock())
        async with lock:
            if self._known_good(account_key, digest):
                return True
            async with self._kdf_slots:
                return await asyncio.to_thread(self.open_with_password, account_key, password)

    def sweep_temporary(self, older_than: float = 60.0) -> int:
        """Remove temporary files a killed process left behind mid-write (never a live one:
        a write takes milliseconds). Returns how many went."""
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for path in self._dir.iterdir():
                if not (path.name.startswith(".") and path.name.endswith(".tmp")):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - path.stat().st_mtime >= older_than:
                        path.unlink()
                        removed += 1
        return removed

    # -- the earlier plain store ----------------------------------------------------------------

    def _legacy_paths(self, account_key: str) -> tuple[Path, Path]:
        return (self.state_dir / "tokens" / safe_name(account_key, ".json"),
                self.state_dir / "passwords" / safe_name(account_key, ".scrypt"))

    def has_legacy(self, account_key: str) -> bool:
        return any(p.exists() for p in self._legacy_paths(account_key))

    def migrate(self, account_key: str, password: str | None = None) -> bool:
        """Move the earlier plain token file (and password hash) into a new vault: under the
        master key at start-up, or under ``password`` once a client logged in with it (the
        old hash only verifies a password, it cannot encrypt). True if a vault was made."""
        from ..passwords import check_password, legacy_encode
        from .store import FileTokenStore

        tokens_path, hash_path = self._legacy_paths(account_key)
        if not tokens_path.exists() and not hash_path.exists():
            return False
        with self._locked(account_key):
            if self.exists(account_key):
                # A crash after the vault was written, before the clean-up: finish it.
                self._remove_legacy(account_key)
                return False
            state = FileTokenStore(self.state_dir).load(account_key)
            old_hash = hash_path.read_text("ascii").strip() if hash_path.exists() else None
        if password is not None:
            try:
                if old_hash is None or not check_password(old_hash, legacy_encode(password)):
                    return False
            except ValueError:
                return False
            self.create(account_key, password=password, state=state)
        elif self._master is not None:
            self.create(account_key, password=None, state=state, legacy_hash=old_hash)
        else:
            return False
        with self._locked(account_key):
            self._remove_legacy(account_key)
        log.info("%s: tokens moved from the plain store into the encrypted vault", account_key)
        return True

    def _remove_legacy(self, account_key: str) -> None:
        for path in self._legacy_paths(account_key):
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

    def open_with_master(self, account_key: str) -> bool:
        got = self._read(account_key)
        return got is not None and self._data_key(account_key, got[0]) is not None
