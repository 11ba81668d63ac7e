"""The daemon's SMTP listener: one ``SmtpFront`` per connection, the transaction each
logged-in session gets (``Relay`` to its upstream), and draining them at shutdown."""

from __future__ import annotations

import asyncio
import socket

from ..config import Account, Settings
from ..daemon.limits import ConnectionLimits
from ..login import Gate
from .front import SizeHint, SmtpFront
from .transaction import Relay, Transaction
from .upstream import SmtpUpstreamSession


class SmtpService:
    """The SMTP listener of the daemon and the connections it has open."""

    def __init__(self, gate: Gate, settings: Settings,
                 limits: ConnectionLimits | None = None) -> None:
        self.gate = gate
        self.settings = settings
        self.limits = limits or ConnectionLimits(settings.smtp.max_connections,
                                                 settings.smtp.max_connections_per_ip)
        self.hostname = socket.gethostname() or "localhost"
        self.fronts: set[SmtpFront] = set()
        self.size_hint = SizeHint()

    def open_transaction(self, account: Account, upstream: SmtpUpstreamSession) -> Transaction:
        """Where a session's mail goes once it logged in (``transaction.OpenTransaction``)."""
        return Relay(account, upstream, self.gate, self.settings)

    def _make(self) -> SmtpFront:
        front = SmtpFront(self.settings, self.hostname, self.gate, self.open_transaction,
                          self.size_hint, self.fronts.discard, self.limits)
        self.fronts.add(front)
        return front

    async def start(self, host: str, port: int, backlog: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(self._make, host, port, backlog=backlog,
                                        reuse_address=True)

    async def drain(self, grace: float) -> None:
        """Let sessions in progress finish for ``grace`` seconds, then cut them off."""
        tasks = {task for f in self.fronts if (task := f.session_task) is not None}
        pending: set[asyncio.Task[None]] = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
        for front in list(self.fronts):
            if front.transport is not None:
                front.transport.close()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
