"""``mailproxy password set|add|remove|list``: the local passwords that open an account's vault."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from ..config import Account, Settings
from ..vault import Vault, VaultError
from ..vault.policy import first_password
from .common import EXIT_OK, EXIT_USAGE, CliError, need, open_existing, open_vault, read


def password(settings: Settings, account: Account, args: argparse.Namespace) -> int:
    vault = open_vault(settings, write=args.action != "list")
    key, address = account.key, account.address
    try:
        if args.action == "list":
            return _list(vault, account)
        if args.action == "remove":
            if not vault.exists(key):
                raise CliError(f"{address} has no local passwords yet", EXIT_USAGE)
            open_existing(vault, account, "to change its passwords")
            slot = vault.remove_slot(key, args.label)
            print(f"local password {slot.label!r} of {address} removed")
            return EXIT_OK
        if args.action == "add" and not vault.exists(key):
            raise CliError(f"{address} has no vault yet: run `mailproxy authorize {address}` "
                           f"or `mailproxy password set {address}` first", EXIT_USAGE)
        new = need(read(f"New local password for {address}: ", confirm=True))
        if args.action == "set":
            if vault.exists(key):
                open_existing(vault, account, "to replace it")
                vault.replace_passwords(key, new)
            else:
                first_password(vault, key, new)
            print(f"local password for {address} set (any others removed)")
            return EXIT_OK
        open_existing(vault, account, "to add one")
        label = args.label or f"password-{len(vault.slots(key)) + 1}"
        vault.add_password(key, new, label)
        print(f"local password {label!r} added for {address}")
        return EXIT_OK
    except VaultError as exc:
        raise CliError(str(exc)) from None


def _list(vault: Vault, account: Account) -> int:
    slots = vault.slots(account.key)
    if not slots:
        print(f"{account.address}: no local passwords (run `mailproxy authorize "
              f"{account.address}`)")
        return EXIT_OK
    for slot in slots:
        created = datetime.fromtimestamp(slot.created, UTC).strftime("%Y-%m-%d %H:%M UTC")
        kind = {"password": "password", "master": "master key", "legacy": "migrated"}[slot.type]
        print(f"{slot.label:<24} {kind:<10} added {created}  (id {slot.id})")
    return EXIT_OK
