"""The vault file's format (``mailproxy-vault/1``): its JSON layout, key slots and sealed tokens.

Pure functions over dicts and bytes: no files, no locks, no memory of opened keys. Building or
opening a password slot runs scrypt, so callers on the event loop do that in a thread.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from ..tokens.keys import (
    ScryptParams,
    b64d,
    b64e,
    encode_password,
    master_slot_key,
    scrypt_key,
    seal,
    unseal,
)
from ..tokens.store import TokenState

FORMAT = "mailproxy-vault/1"
SlotType = Literal["password", "master", "legacy"]
META_NUMBERS = ("expires_at", "last_refresh", "authorized_at")
META_TEXTS = ("needs_authorization", "last_error")


@dataclass(frozen=True)
class SlotInfo:
    id: str
    type: SlotType
    label: str
    created: float


def aad(kind: str, account_key: str, vault_id: str, slot_id: str = "") -> bytes:
    # Binds each ciphertext to its account, vault and slot: a blob copied from another file
    # does not open.
    return "\0".join((FORMAT, kind, account_key, vault_id, slot_id)).encode()


def parse(raw: bytes, account_key: str) -> dict[str, Any]:
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


def new_vault(account_key: str, vault_id: str, slots: list[dict[str, Any]],
              created: float) -> dict[str, Any]:
    """A vault's contents before its first tokens are sealed in (``with_state``)."""
    return {"format": FORMAT, "account": account_key, "vault_id": vault_id, "slots": slots,
            "meta": {"created": created}}


def serialize(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


# -- key slots ----------------------------------------------------------------------------------


def slot_info(slot: dict[str, Any]) -> SlotInfo:
    return SlotInfo(str(slot.get("id")), slot.get("type", "password"), str(slot.get("label", "")),
                    float(slot.get("created", 0.0)))


def password_slot(account_key: str, vault_id: str, key: bytes, password: str, label: str,
                  created: float) -> dict[str, Any]:
    """The data ``key`` wrapped under scrypt(``password``, fresh parameters)."""
    params = ScryptParams.fresh()
    slot_id = "p-" + secrets.token_hex(4)
    nonce, wrapped = seal(scrypt_key(encode_password(password), params), key,
                          aad("slot", account_key, vault_id, slot_id))
    return {"id": slot_id, "type": "password", "label": label, "created": created,
            "kdf": {"name": "scrypt", "n": params.n, "r": params.r, "p": params.p,
                    "salt": b64e(params.salt)},
            "nonce": b64e(nonce), "wrapped": b64e(wrapped)}


def password_kek(slot: dict[str, Any], secret: bytes) -> bytes:
    """The key that unwraps a password slot; raises KeyError, TypeError or ValueError when the
    slot's parameters are unusable."""
    kdf = slot.get("kdf") or {}
    params = ScryptParams(int(kdf["n"]), int(kdf["r"]), int(kdf["p"]), b64d(kdf["salt"]))
    return scrypt_key(secret, params)


def master_slot(account_key: str, vault_id: str, key: bytes, master: bytes,
                created: float) -> dict[str, Any]:
    salt = secrets.token_bytes(16)
    nonce, wrapped = seal(master_slot_key(master, salt), key,
                          aad("slot", account_key, vault_id, "master"))
    return {"id": "master", "type": "master", "label": "master key", "created": created,
            "salt": b64e(salt), "nonce": b64e(nonce), "wrapped": b64e(wrapped)}


def master_kek(slot: dict[str, Any], master: bytes) -> bytes:
    return master_slot_key(master, b64d(slot["salt"]))


def legacy_slot(password_hash: str, created: float) -> dict[str, Any]:
    """A verifier only (the earlier store's password hash): it opens nothing by itself."""
    return {"id": "legacy", "type": "legacy", "label": "migrated password", "created": created,
            "hash": password_hash}


def unwrap(account_key: str, data: dict[str, Any], slot: dict[str, Any],
           kek: bytes) -> bytes | None:
    """The data key in ``slot``, or None if ``kek`` does not open it."""
    try:
        return unseal(kek, b64d(slot["nonce"]), b64d(slot["wrapped"]),
                      aad("slot", account_key, data["vault_id"], str(slot["id"])))
    except (KeyError, ValueError):
        return None


# -- tokens and the state around them ------------------------------------------------------------


def state_from(data: dict[str, Any], tokens: dict[str, Any] | None) -> TokenState:
    """The ``TokenState`` of a vault: ``tokens`` None means the vault is locked."""
    meta = data["meta"]
    values: dict[str, Any] = {}
    for name in META_NUMBERS:
        value = meta.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            values[name] = float(value)
    for name in META_TEXTS:
        if isinstance(meta.get(name), str):
            values[name] = meta[name]
    if tokens is None:
        return TokenState(locked=True, **values)
    return TokenState(refresh_token=tokens.get("refresh_token") or None,
                      access_token=tokens.get("access_token") or None, **values)


def open_tokens(account_key: str, data: dict[str, Any], key: bytes,
                where: str) -> dict[str, Any]:
    """The sealed tokens of ``data`` (``where`` names the file in errors)."""
    sealed = data.get("tokens")
    if sealed is None:
        return {}
    plain = unseal(key, b64d(sealed.get("nonce")), b64d(sealed.get("ciphertext")),
                   aad("tokens", account_key, data["vault_id"]))
    if plain is None:
        raise ValueError(f"{where}: the tokens do not decrypt (damaged file)")
    tokens = json.loads(plain)
    if not isinstance(tokens, dict):
        raise ValueError(f"{where}: sealed tokens are not an object")
    return tokens


def with_state(account_key: str, data: dict[str, Any], key: bytes, state: TokenState,
               now: float) -> dict[str, Any]:
    """``data`` holding ``state``: the tokens sealed under ``key``, the rest readable."""
    meta = dict(data["meta"])
    for name in (*META_NUMBERS, *META_TEXTS):
        meta[name] = getattr(state, name)
    meta["has_refresh_token"] = bool(state.refresh_token)
    meta["updated"] = now
    plain = json.dumps({"refresh_token": state.refresh_token,
                        "access_token": state.access_token}).encode()
    nonce, ciphertext = seal(key, plain, aad("tokens", account_key, data["vault_id"]))
    return {**data, "meta": meta,
            "tokens": {"nonce": b64e(nonce), "ciphertext": b64e(ciphertext)}}
