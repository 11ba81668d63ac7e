"""The vault files (``state_dir/vault/<account>.vault``): the ``TokenStore`` methods, creating a
vault and editing its key slots, and the data keys opened in this process.

Blocking and thread-safe: the CLI calls it directly, the daemon from a thread. Every write is a
read-modify-write of the whole file under an flock, written atomically.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..tokens.keys import encode_password, new_key
from ..tokens.store import (
    Stamp,
    TokenState,
    account_lock,
    atomic_write,
    ensure_private_dir,
    file_stamp,
    read_file,
    safe_name,
)
from . import format as fmt
from .errors import VaultError, VaultLocked
from .format import SlotInfo

log = logging.getLogger("mailproxy.vault")


@dataclass(frozen=True)
class _Open:
    vault_id: str
    data_key: bytes


class VaultFiles:
    """One vault file per account under ``state_dir/vault``, and the data keys this process
    has opened (from a password, or from the master key when one is configured)."""

    def __init__(self, state_dir: Path, *, master_key: bytes | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.state_dir = Path(state_dir)
        self._dir = self.state_dir / "vault"
        self._master = master_key
        self._clock = clock
        self._open: dict[str, _Open] = {}
        self._seen: dict[str, Stamp | None] = {}
        # Per account: (stamp, vault id, slot ids) of the file version last read or written.
        self._slot_ids: dict[str, tuple[Stamp, str, frozenset[Any]]] = {}
        self._mutex = threading.Lock()

    @property
    def has_master_key(self) -> bool:
        return self._master is not None

    def path(self, account_key: str) -> Path:
        return self._dir / safe_name(account_key, ".vault")

    def locked(self, account_key: str) -> contextlib.AbstractContextManager[None]:
        """Exclusive use of the account's vault file, across processes and threads."""
        return account_lock(self._dir, account_key)

    def _forget_logins(self, account_key: str, slot_id: str | None = None) -> None:
        """A password slot (or, with None, every slot) stopped opening this account's vault:
        a subclass that remembers verified logins drops them here."""

    # -- reading --------------------------------------------------------------------------------

    def _read(self, account_key: str) -> tuple[dict[str, Any], Stamp] | None:
        got = read_file(self.path(account_key))
        if got is None:
            return None
        raw, stamp = got
        try:
            return fmt.parse(raw, account_key), stamp
        except (ValueError, TypeError) as exc:  # JSON and Unicode errors are ValueErrors
            raise ValueError(f"{self.path(account_key)}: not a usable vault file: {exc}") from None

    def exists(self, account_key: str) -> bool:
        return file_stamp(self.path(account_key)) is not None

    def slots(self, account_key: str) -> list[SlotInfo]:
        got = self._read(account_key)
        return [] if got is None else [fmt.slot_info(s) for s in got[0]["slots"]]

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
                self._forget_logins(account_key)
                known = None
        if known is not None:
            return known.data_key
        if self._master is None:
            return None
        for slot in data["slots"]:
            if slot.get("type") == "master":
                key = fmt.unwrap(account_key, data, slot, fmt.master_kek(slot, self._master))
                if key is not None:
                    self._remember(account_key, data["vault_id"], key)
                    return key
        return None

    def _remember(self, account_key: str, vault_id: str, key: bytes) -> None:
        with self._mutex:
            self._open[account_key] = _Open(vault_id, key)

    def _tokens(self, account_key: str, data: dict[str, Any], key: bytes) -> dict[str, Any]:
        return fmt.open_tokens(account_key, data, key, str(self.path(account_key)))

    def _slot_current(self, account_key: str, slot_id: str) -> bool:
        """Whether ``slot_id`` is still a slot of the vault version opened in this process."""
        with self._mutex:
            known = self._open.get(account_key)
        if known is None:
            return False
        # A login costs a stat while the file is unchanged; it is read again only when its
        # stamp changes (every write replaces the file: a new inode).
        stamp = file_stamp(self.path(account_key))
        with self._mutex:
            seen = self._slot_ids.get(account_key)
        if seen is None or seen[0] != stamp:
            got = self._read(account_key)
            if got is None:
                return False
            seen = self._note_slots(account_key, got[1], got[0])
        return seen[1] == known.vault_id and slot_id in seen[2]

    def _note_slots(self, account_key: str, stamp: Stamp, data: dict[str, Any]
                    ) -> tuple[Stamp, str, frozenset[Any]]:
        """The slots of the file version ``stamp`` (just read or written): logins need no
        read of it."""
        seen = (stamp, data["vault_id"], frozenset(s.get("id") for s in data["slots"]))
        with self._mutex:
            self._slot_ids[account_key] = seen
        return seen

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
        return fmt.state_from(data, tokens)

    def save(self, account_key: str, state: TokenState) -> None:
        self.update(account_key, lambda _: state)

    def update(self, account_key: str, fn: Callable[[TokenState], TokenState]) -> TokenState:
        with self.locked(account_key):
            got = self._read(account_key)
            if got is None:
                raise VaultLocked(f"account {account_key} has no vault yet")
            data, _ = got
            key = self._data_key(account_key, data)
            if key is None:
                raise VaultLocked(f"the vault of {account_key} is locked")
            old = fmt.state_from(data, self._tokens(account_key, data, key))
            new = fn(old)
            if new != old:
                self._write(account_key, fmt.with_state(account_key, data, key, new,
                                                        self._clock()))
            return new

    def changed(self, account_key: str) -> bool:
        if account_key not in self._seen:
            return True
        return file_stamp(self.path(account_key)) != self._seen[account_key]

    def _write(self, account_key: str, data: dict[str, Any]) -> None:
        ensure_private_dir(self._dir)
        stamp = atomic_write(self.path(account_key), fmt.serialize(data))
        self._seen[account_key] = stamp
        # This process's own write (a refreshed token): the next login needs no read of it.
        self._note_slots(account_key, stamp, data)

    # -- creating and changing slots (blocking: CLI, or a thread in the daemon) -----------------

    def create(self, account_key: str, *, password: str | None, label: str = "default",
               state: TokenState | None = None, legacy_hash: str | None = None) -> None:
        """A new vault under a new data key (replacing any old one): slots for ``password``
        and the master key, holding ``state``. Opens it in this process."""
        if password is None and self._master is None:
            raise VaultError("a new vault needs a local password or a master key")
        vault_id, key = secrets.token_hex(8), new_key()
        slots = []
        if password is not None:
            slots.append(fmt.password_slot(account_key, vault_id, key, password, label,
                                           self._clock()))
        if legacy_hash is not None:
            slots.append(fmt.legacy_slot(legacy_hash, self._clock()))
        if self._master is not None:
            slots.append(fmt.master_slot(account_key, vault_id, key, self._master,
                                         self._clock()))
        data = fmt.new_vault(account_key, vault_id, slots, self._clock())
        with self.locked(account_key):
            self._write(account_key, fmt.with_state(account_key, data, key,
                                                    state or TokenState(), self._clock()))
            self._remember(account_key, vault_id, key)
            self._forget_logins(account_key)

    def _modify(self, account_key: str,
                fn: Callable[[dict[str, Any], bytes | None], dict[str, Any] | None]) -> None:
        with self.locked(account_key):
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
            added.append(fmt.password_slot(account_key, data["vault_id"], key, password, label,
                                           self._clock()))
            return {**data, "slots": [*data["slots"], *added]}

        self._modify(account_key, apply)
        return fmt.slot_info(added[0])

    def replace_passwords(self, account_key: str, password: str, label: str = "default") -> None:
        """All password slots become this one password (``password set``)."""
        def apply(data: dict[str, Any], key: bytes | None) -> dict[str, Any]:
            if key is None:
                raise VaultLocked(f"the vault of {account_key} is locked")
            kept = [s for s in data["slots"] if s.get("type") == "master"]
            slot = fmt.password_slot(account_key, data["vault_id"], key, password, label,
                                     self._clock())
            return {**data, "slots": [slot, *kept]}

        self._modify(account_key, apply)
        self._forget_logins(account_key)

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
        self._forget_logins(account_key, str(removed[0].get("id")))
        return fmt.slot_info(removed[0])

    def ensure_master_slot(self, account_key: str) -> bool:
        """Add (or repair) the master slot of an open vault when a master key is configured;
        True if the file changed."""
        master = self._master
        if master is None:
            return False
        changed: list[bool] = []

        def apply(data: dict[str, Any], key: bytes | None) -> dict[str, Any] | None:
            known = self._open.get(account_key)
            key = key or (known.data_key if known and known.vault_id == data["vault_id"]
                          else None)
            if key is None:
                return None
            for slot in data["slots"]:
                if slot.get("type") == "master" and fmt.unwrap(
                        account_key, data, slot, fmt.master_kek(slot, master)) == key:
                    return None
            others = [s for s in data["slots"] if s.get("type") != "master"]
            changed.append(True)
            return {**data, "slots": [*others, fmt.master_slot(
                account_key, data["vault_id"], key, master, self._clock())]}

        self._modify(account_key, apply)
        return bool(changed)

    def upgrade_legacy_slot(self, account_key: str, data: dict[str, Any],
                            password: str) -> tuple[bytes, str] | None:
        """Give ``password`` (already checked against the legacy slot's hash) a real slot in
        place of that verifier. The migrated vault opens with the master key it was made
        under; None without it. Returns the data key and the new slot's id."""
        key = self._data_key(account_key, data)
        if key is None:
            log.warning("%s: the migrated vault needs the master key it was created with",
                        account_key)
            return None

        def apply(current: dict[str, Any], _: bytes | None) -> dict[str, Any]:
            slot = fmt.password_slot(account_key, current["vault_id"], key, password,
                                     "default", self._clock())
            others = [s for s in current["slots"] if s.get("type") != "legacy"]
            return {**current, "slots": [slot, *others]}

        self._modify(account_key, apply)
        got = self._read(account_key)
        slot_id = got[0]["slots"][0]["id"] if got else "?"
        return key, str(slot_id)

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

    # -- opening --------------------------------------------------------------------------------

    def _open_password_slot(self, account_key: str, data: dict[str, Any],
                            password: str) -> tuple[bytes, str] | None:
        """Blocking (scrypt per password slot): the data key and the id of the first password
        slot ``password`` opens, now remembered in this process; None if none does."""
        secret = encode_password(password)
        for slot in data["slots"]:
            if slot.get("type") != "password":
                continue
            try:
                kek = fmt.password_kek(slot, secret)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("%s: unusable password slot %s: %s", account_key, slot.get("id"), exc)
                continue
            key = fmt.unwrap(account_key, data, slot, kek)
            if key is not None:
                self._remember(account_key, data["vault_id"], key)
                return key, str(slot["id"])
        return None

    def open_with_master(self, account_key: str) -> bool:
        got = self._read(account_key)
        return got is not None and self._data_key(account_key, got[0]) is not None

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
