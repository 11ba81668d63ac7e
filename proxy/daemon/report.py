"""What the daemon says about itself: the start-up banner and account report in the log, the
one-line status for systemd, and the per-account report of `mailproxy status` and the admin
page."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import Settings
from ..login import authorize_hint
from ..tokens.manager import TokenManager
from ..vault import Vault

log = logging.getLogger("mailproxy")


def needing_attention(settings: Settings, tokens: TokenManager) -> list[str]:
    """Accounts whose grant a person must renew, as last known (no disk access)."""
    out = []
    for account in settings.accounts:
        try:
            if tokens.source.last_state(account.key).needs_authorization:
                out.append(account.address)
        except KeyError:
            continue
    return out


def status_line(sessions: int, settings: Settings, tokens: TokenManager) -> str:
    """One line for systemd's STATUS= (``systemctl status``)."""
    attention = needing_attention(settings, tokens)
    count = len(settings.accounts)
    accounts = (f"{len(attention)} need attention: " + ", ".join(attention) if attention
                else "all authorized")
    return (f"{sessions} session{'' if sessions == 1 else 's'}; "
            f"{count} account{'' if count == 1 else 's'}, {accounts}")


async def account_statuses(settings: Settings, tokens: TokenManager, vault: Vault,
                           queued: Mapping[str, Any],
                           sent: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every account as the token manager knows it, with its vault's slots and notifications
    (read in a thread) and its queue."""
    out = []
    for account in settings.accounts:
        status = tokens.status(account.key)
        try:
            slots = await asyncio.to_thread(vault.slots, account.key)
            meta = await asyncio.to_thread(vault.meta, account.key)
        except (OSError, ValueError):
            slots, meta = [], {}
        status["passwords"] = sum(1 for s in slots if s.type != "master")
        status["master_key_slot"] = any(s.type == "master" for s in slots)
        status["notifications"] = meta.get("notified") or {}
        status["sent_this_run"] = sent.get(account.key, [])
        if account.key in queued:
            status["queue"] = queued[account.key]
        out.append(status)
    return out


def banner(config_path: Path | None, settings: Settings,
           addresses: Mapping[str, tuple[str, int]]) -> None:
    """What a person checks first in a log: which build, which files, which listeners."""
    log.info("mailproxy %s starting: configuration %s, state directory %s", __version__,
             config_path or "(none: built-in defaults)", settings.state_dir)
    for name, address in addresses.items():
        # Off loopback, passwords in the clear are refused (require_tls = "auto"), or
        # tls.contexts.startup_warnings has said that they are not.
        log.info("%s listening on %s:%d", name, *address)
    for account in settings.accounts:
        protocols = ", ".join(f"{p} via {s.host}:{s.port}" for p in ("imap", "pop3", "smtp")
                              if (s := account.server(p)) is not None)
        log.info("account %s (%s, flow %s): %s", account.address, account.provider,
                 account.flow, protocols or "no upstream servers")


def accounts_at_start(settings: Settings, vault: Vault, tokens: TokenManager) -> None:
    """Say at start-up what each account still needs, before a client finds out."""
    for account in settings.accounts:
        if not vault.exists(account.key) and not vault.has_legacy(account.key):
            log.warning("account %s is not authorized yet: %s", account.address,
                        authorize_hint(account))
            continue
        status = tokens.status(account.key)
        if status["locked"]:
            try:  # the reason is kept outside the encryption: known while locked
                reason = vault.meta(account.key).get("needs_authorization")
            except (OSError, ValueError):
                reason = None
            if reason:
                log.warning("account %s is not authorized (%s): %s", account.address,
                            reason, authorize_hint(account))
            else:
                log.info("account %s: token vault locked until the first client login",
                         account.address)
        elif not status["authorized"]:
            log.warning("account %s is not authorized (%s): %s", account.address,
                        status["needs_authorization"], authorize_hint(account))
