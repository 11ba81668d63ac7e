"""``mailproxy status``: each account's token state, from the running daemon or from disk."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from ..config import Account, Settings
from ..daemon.control import ControlError, query_sync
from ..vault import Vault
from .common import EXIT_OK, CliError


def status(settings: Settings, *, as_json: bool) -> int:
    try:
        reply = query_sync(settings.control_path, "status")
    except ControlError as exc:
        raise CliError(f"the daemon's status socket did not answer properly: {exc}") from None
    if reply is not None and "accounts" not in reply:
        # A daemon is running and said no (another user asked, or an error): not "no daemon".
        error = str(reply.get("error") or "no account status in its reply")
        hint = "; run `mailproxy status` as the user the daemon runs as" \
            if error == "permission denied" else ""
        raise CliError(f"the daemon at {settings.control_path} refused: {error}{hint}")
    if reply is not None:
        report: dict[str, Any] = {"source": "daemon", **reply}
    else:
        report = {"source": "disk", "accounts": [_disk_status(settings, a)
                                                 for a in settings.accounts]}
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render_status(report))
    return EXIT_OK


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
    else:
        lines = ["no daemon running: state on disk"]
    if not report["accounts"]:
        lines.append("no accounts configured")
    for st in report["accounts"]:
        if st.get("authorized"):
            state = "authorized"
        else:
            state = f"NOT AUTHORIZED: {st.get('needs_authorization')}"
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
    return "\n".join(lines)
