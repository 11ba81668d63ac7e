"""The daemon's SMTP listener: one ``SmtpFront`` per connection, the transaction each
logged-in session gets (``Relay`` to its upstream), and draining them at shutdown."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from ..config import Account, Settings
from ..login import Gate
from ..tls.contexts import ServerTls
from .front import SizeHint, SmtpFront
from .transaction import Relay, Transaction
from .upstream import SmtpUpstreamSession


class SmtpService:
    """The SMTP listener of the daemon and the connections it has open."""

    def __init__(self, gate: Gate, settings: Settings, tls: ServerTls | None = None) -> None:
        self.gate = gate
        self.settings = settings
        self.tls = tls
        self.hostname = socket.gethostname() or "localhost"
        self.fronts: set[SmtpFront] = set()
        self.size_hint = SizeHint()

    def open_transaction(self, account: Account, upstream: SmtpUpstreamSession) -> Transaction:
        """Where a session's mail goes once it logged in (``transaction.OpenTransaction``)."""
        return Relay(account, upstream, self.gate, self.settings)

    def _make(self, implicit: bool = False) -> SmtpFront:
        tls: dict[str, Any] = {}
        if self.tls is not None and not implicit:  # implicit TLS: nothing to offer or require
            listener = self.settings.smtp
            tls = {"tls_context": self.tls.current(listener.tls_min_version),
                   "tls_required": listener.plain_requires_tls}
        front = SmtpFront(self.settings, self.hostname, self.gate, self.open_transaction,
                          self.size_hint, self.fronts.discard, **tls)
        self.fronts.add(front)
        return front

    async def start(self, host: str, port: int, backlog: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(self._make, host, port, backlog=backlog,
                                        reuse_address=True)

    async def start_implicit(self, host: str, port: int, backlog: int) -> asyncio.Server:
        """The implicit-TLS listener (RFC 8314), the certificate current at each handshake."""
        assert self.tls is not None
        loop = asyncio.get_running_loop()
        context = self.tls.listener_context(self.settings.smtp.tls_min_version)
        return await loop.create_server(lambda: self._make(implicit=True), host, port,
                                        backlog=backlog, reuse_address=True, ssl=context)

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
