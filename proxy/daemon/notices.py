"""What the daemon sends to the [notify] hook: token events (once, remembered in the vault for
those that persist) and messages the outbound queue gave up on, and what it sent this run."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

from ..config import Account, Settings
from ..login import Gate
from ..vault import VaultError
from .notify import Event, EventName, Notifier, event_key

log = logging.getLogger("mailproxy")


class Notices:
    """The daemon's ``notifier`` (a reload replaces it) and, per account, the notifications
    this process sent (``sent``: event, time, results)."""

    def __init__(self, settings: Settings, gate: Gate) -> None:
        self.notifier = _notifier(settings)
        self.sent: dict[str, list[dict[str, Any]]] = {}
        self._gate = gate
        self._retired: list[Notifier] = []

    def replace(self, settings: Settings) -> None:
        # The old one may still be running a command for an event: closed at shutdown.
        self._retired.append(self.notifier)
        self.notifier = _notifier(settings)

    async def aclose(self) -> None:
        for notifier in [*self._retired, self.notifier]:
            await notifier.aclose()

    async def message_failed(self, account: Account, reason: str) -> None:
        """The outbound queue gave up on a message: the `message_failed` notification."""
        if not self.notifier.enabled:
            log.info("%s: message_failed (%s); no [notify] hook configured", account.address,
                     reason)
            return
        event = Event(account.address, "message_failed", reason, time.time())
        results = await self.notifier.send(event)
        self.sent.setdefault(account.key, []).append(
            {"event": "message_failed", "at": event.at, "results": results})

    async def token_event(self, account: Account, name: str, reason: str,
                          deadline: float | None) -> None:
        """A token event from the manager: notify once (remembered in the vault across
        restarts for the events that persist)."""
        if not self.notifier.enabled:
            log.info("%s: %s (%s); no [notify] hook configured", account.address, name, reason)
            return
        event = Event(account.address, cast(EventName, name), reason, time.time(), deadline)
        if name in ("authorization_required", "deadline_approaching"):
            mark = f"{name}:{deadline:.0f}" if deadline is not None else event_key(event)
            try:
                if not await asyncio.to_thread(self._gate.vault.mark_notified, account.key,
                                               mark):
                    return  # sent before, maybe by an earlier run of the daemon
            except (OSError, ValueError, VaultError) as exc:
                log.warning("%s: cannot record the notification: %s", account.address, exc)
        results = await self.notifier.send(event)
        self.sent.setdefault(account.key, []).append(
            {"event": name, "at": event.at, "results": results})


def _notifier(settings: Settings) -> Notifier:
    master = settings.vault.master_key or ""
    return Notifier(settings.notify, drop_env=[master[4:]] if master.startswith("env:") else [])
