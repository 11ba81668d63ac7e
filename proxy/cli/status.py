"""``mailproxy status``: each account's token state and outbound queue, from the running
daemon or from disk."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..config import Account, Settings
from ..daemon.control import ControlError, query_sync
from ..vault import Vault
from .common import CliError, owner_of

# Exit codes of `mailproxy status` (README "Exit status"), for scripts and health checks.
STATUS_OK, STATUS_ATTENTION, STATUS_NO_DAEMON = 0, 1, 3


def status(settings: Settings, *, as_json: bool) -> int:
    try:
        reply = query_sync(settings.control_path, "status")
    except ControlError as exc:
        raise CliError(f"the daemon's status socket did not answer properly: {exc}") from None
    except PermissionError:
        reply = {"error": "permission denied"}
    refused = reply is not None and "accounts" not in reply
    if reply is not None and not refused:
        report: dict[str, Any] = {"source": "daemon", **reply}
    else:
        report = {"source": "disk", "accounts": [_disk_status(settings, a)
                                                 for a in settings.accounts]}
        _disk_queue(settings, report["accounts"])
        if refused:
            # Typically root asking a daemon that answers its own user only.
            report["daemon"] = f"running, but it did not answer uid {os.geteuid()}: " \
                f"{(reply or {}).get('error')}; run `mailproxy status` as " \
                f"{_owner(settings.state_dir)} for its live state"
    for st in report["accounts"]:
        if not st.get("authorized"):
            st["reason"] = explain(st.get("needs_authorization"), st["account"])
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render_status(report))
    if reply is None:
        return STATUS_NO_DAEMON
    if not report["accounts"] or not all(st.get("authorized") for st in report["accounts"]):
        return STATUS_ATTENTION
    return STATUS_OK


def explain(reason: object, address: str) -> str:
    """Why an account is not authorized, and what to run, for a person."""
    text = str(reason or "not authorized yet")
    fix = f"run `mailproxy authorize {address}`"
    if text.startswith("invalid_grant"):
        return f"refresh token revoked or expired ({text}): {fix}"
    if text.startswith("vault unreadable"):
        return text
    return f"{text}: {fix}"


def _owner(path: Path) -> str:
    owner = owner_of(path)
    return owner[1] if owner else "the daemon's user"


def _disk_status(settings: Settings, account: Account) -> dict[str, Any]:
    vault = Vault(settings.state_dir)
    key = account.key
    base: dict[str, Any] = {"account": account.address, "flow": account.flow}
    try:
        exists = vault.exists(key)
        meta = vault.meta(key) if exists else {}
        slots = vault.slots(key) if exists else []
    except (OSError, ValueError) as exc:
        return {**base, "authorized": False, "needs_authorization": f"vault unreadable: {exc}"}
    if not exists:
        legacy = vault.has_legacy(key)  # moved into a vault at the next start or login
        return {**base, "authorized": legacy, "locked": None,
                "needs_authorization": None if legacy else "not authorized yet"}
    reason: str | None = meta.get("needs_authorization")
    app_only = account.flow in ("client_credentials", "service_account")
    if reason is None and not app_only and not meta.get("has_refresh_token"):
        reason = "not authorized yet"
    return {**base, "authorized": reason is None, "needs_authorization": reason,
            "locked": None, "expires_at": meta.get("expires_at"),
            "last_refresh": meta.get("last_refresh"), "last_error": meta.get("last_error"),
            "authorized_at": meta.get("authorized_at"),
            "passwords": sum(1 for s in slots if s.type != "master"),
            "master_key_slot": any(s.type == "master" for s in slots),
            "notifications": meta.get("notified") or {}}


def _disk_queue(settings: Settings, accounts: list[dict[str, Any]]) -> None:
    """The queue's index, read as `mailproxy queue list` does: per account, what waits."""
    from ..queue import admin

    try:
        stats = admin.stats(settings.queue_dir)
    except (OSError, ValueError, sqlite3.Error) as exc:
        for entry in accounts:
            entry["queue"] = {"error": str(exc)}
        return
    now = time.time()
    for entry in accounts:
        st = stats.get(entry["account"].casefold())
        if st is not None:
            entry["queue"] = {"queued": st.queued, "queued_bytes": st.size,
                              "oldest_age": now - st.oldest if st.oldest else None,
                              "last_error": st.last_error}


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def _queue_lines(queue: dict[str, Any]) -> list[str]:
    if queue.get("error"):
        return [f"  queue: unreadable: {queue['error']}"]
    line = f"  queue: {queue.get('queued', 0)} message(s)"
    if queue.get("queued") and queue.get("oldest_age") is not None:
        line += f", oldest {_age(queue['oldest_age'])} old"
    if queue.get("delivered") is not None:
        line += f"; this run {queue['delivered']} delivered, {queue.get('failed', 0)} failed"
    lines = [line]
    if queue.get("waiting_for"):
        lines.append(f"  queue waits: {queue['waiting_for']}")
    if queue.get("last_error"):
        lines.append(f"  queue last error: {queue['last_error']}")
    return lines


def _when(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    stamp = datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    delta = value - time.time()
    if abs(delta) < 48 * 3600:
        rel = f"in {int(delta // 60)} min" if delta >= 0 else f"{int(-delta // 60)} min ago"
        return f"{stamp} ({rel})"
    return stamp


def render_status(report: dict[str, Any]) -> str:
    if report["source"] == "daemon":
        lines = [f"daemon running (pid {report.get('pid', '?')})"]
    elif report.get("daemon"):
        lines = [f"daemon {report['daemon']}", "state on disk:"]
    else:
        lines = ["no daemon running: state on disk"]
    if not report["accounts"]:
        lines.append("no accounts configured")
    for st in report["accounts"]:
        if st.get("authorized"):
            state = "authorized"
        else:
            state = f"NOT AUTHORIZED: {st.get('reason') or st.get('needs_authorization')}"
        if st.get("locked") is True:
            state += ", vault locked (opens at the first client login)"
        elif st.get("locked") is False:
            state += ", vault open"
        lines.append(f"{st['account']} ({st.get('flow')}): {state}")
        for label, name in (("access token expires", "expires_at"),
                            ("last refresh", "last_refresh"), ("next refresh", "next_refresh"),
                            ("refresh token deadline", "refresh_token_deadline")):
            if st.get(name) is not None:
                lines.append(f"  {label}: {_when(st[name])}")
        if st.get("last_result"):
            lines.append(f"  last result: {st['last_result']}")
        if st.get("last_error"):
            lines.append(f"  last error: {st['last_error']}")
        for event, at in sorted((st.get("notifications") or {}).items()):
            lines.append(f"  notified: {event.split(':')[0]} at {_when(at)}")
        if st.get("queue"):
            lines += _queue_lines(st["queue"])
    return "\n".join(lines)
