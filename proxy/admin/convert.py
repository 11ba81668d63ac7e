"""The daemon's records turned into what the admin page shows: an account's status report,
a queue index row, a certificate summary (``model.py``'s views). Pure functions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .model import AccountView, CertificateView, Notice, QueuedView, VaultState

if TYPE_CHECKING:
    from ..config import Account
    from ..queue.index import Record
    from ..tls.show import Summary

_PERSISTED_EVENTS = ("authorization_required", "deadline_approaching")


def certificate(summary: Summary) -> CertificateView:
    return CertificateView(
        role=summary.role, path=str(summary.path), subject=summary.subject,
        issuer=summary.issuer, names=summary.names,
        not_before=summary.not_before.timestamp(), not_after=summary.not_after.timestamp(),
        key=summary.key, sha256=summary.sha256)


def _vault_state(status: dict[str, Any], exists: bool) -> VaultState:
    if not exists:
        return "missing"
    locked = status.get("locked")
    if locked is None:
        return "unknown"
    return "locked" if locked else "open"


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def queued(record: Record) -> QueuedView:
    return QueuedView(
        id=record.id, account=record.account, sender=record.sender,
        recipients=tuple(record.recipients), size=record.size, received=record.received,
        attempts=record.attempts, next_attempt=record.next_attempt,
        last_error=record.last_error, delivering=record.state == "active",
        dsn=record.kind == "dsn")


def account_view(account: Account, status: dict[str, Any], exists: bool, now: float) -> AccountView:
    notices = [Notice(str(k).split(":")[0], float(at))
               for k, at in (status.get("notifications") or {}).items()
               if _number(at) is not None]
    notices += [Notice(str(n["event"]), float(n["at"])) for n in status.get("sent_this_run", [])
                if n.get("event") not in _PERSISTED_EVENTS]
    notices.sort(key=lambda n: n.at)
    queue: dict[str, Any] = status.get("queue") or {}
    oldest_age = _number(queue.get("oldest_age"))
    return AccountView(
        key=account.key, address=account.address, provider=account.provider,
        flow=account.flow, authorized=bool(status.get("authorized")),
        reason=status.get("needs_authorization"), vault=_vault_state(status, exists),
        access_token_valid=bool(status.get("access_token_valid")),
        expires_at=_number(status.get("expires_at")),
        last_refresh=_number(status.get("last_refresh")),
        next_refresh=_number(status.get("next_refresh")),
        refreshing=bool(status.get("refreshing")), last_result=status.get("last_result"),
        last_error=status.get("last_error"), failures=int(status.get("consecutive_failures") or 0),
        passwords=int(status.get("passwords") or 0),
        master_key_slot=bool(status.get("master_key_slot")), notices=tuple(notices),
        queued=int(queue.get("queued") or 0),
        queue_oldest=None if oldest_age is None else now - oldest_age,
        queue_error=queue.get("last_error"))
