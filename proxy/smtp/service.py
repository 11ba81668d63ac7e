"""The daemon's SMTP listener: one ``SmtpFront`` per connection, the transaction each session
gets (``Relay`` to its upstream, or the outbound queue: ``[smtp] delivery`` and the device
rules decide), the pool of logged-in upstream sessions, and draining at shutdown."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from ..config import Account, Delivery, Device, Settings
from ..daemon.limits import ConnectionLimits
from ..login import Gate, Refusal
from ..tls.contexts import ServerTls
from .front import DEFAULT_SIZE, SmtpFront
from .pool import SessionPool
from .sessions import Opened
from .transaction import Relay
from .upstream import SmtpUpstreamSession

if TYPE_CHECKING:
    from ..queue.service import QueueService

log = logging.getLogger("mailproxy.smtp")


class SmtpService:
    """The SMTP listener of the daemon and the connections it has open; ``front.Sessions``."""

    def __init__(self, gate: Gate, settings: Settings,
                 queue: QueueService | None = None,
                 limits: ConnectionLimits | None = None, tls: ServerTls | None = None) -> None:
        self.gate = gate
        self.settings = settings
        self.queue = queue
        self.limits = limits or ConnectionLimits(settings.smtp.max_connections,
                                                 settings.smtp.max_connections_per_ip)
        self.tls = tls
        self.hostname = socket.gethostname() or "localhost"
        self.fronts: set[SmtpFront] = set()
        self.pool: SessionPool[SmtpUpstreamSession] = SessionPool(
            idle_timeout=settings.smtp.upstream_pool_idle)

    # -- front.Sessions ------------------------------------------------------------------

    async def log_in(self, user: str, password: str, peer: str) -> Opened:
        started = time.monotonic()
        account = await self.gate.authenticate("smtp", user, password, peer=peer)
        try:
            opened = await self._open(account, self.settings.smtp.delivery)
        except Refusal as refusal:
            log.warning("smtp login for %s from %s refused: %s", account.address, peer,
                        refusal.text)
            self.gate.observer.login("smtp", refusal.kind, time.monotonic() - started)
            raise
        self.gate.observer.login("smtp", "ok", time.monotonic() - started)
        log.info("smtp login for %s from %s (%s) in %.1f ms", account.address, peer,
                 self.settings.smtp.delivery, (time.monotonic() - started) * 1000)
        return opened

    def device_for(self, host: str) -> Device | None:
        return self.settings.device_for(host)

    async def open_device(self, device: Device) -> Opened:
        account = self.settings.account(device.account)
        assert account is not None  # the configuration checks it
        try:
            opened = await self._open(account, device.delivery)
        except Refusal as refusal:
            log.warning("smtp: device %r cannot send as %s: %s", device.name, account.address,
                        refusal.text)
            raise
        log.info("smtp: device %r sends as %s (%s)", device.name, account.address,
                 device.delivery)
        return opened

    async def _open(self, account: Account, delivery: Delivery) -> Opened:
        if account.server("smtp") is None:
            raise Refusal("rejected", f"account {account.address} has no smtp_server "
                          "configured")
        if delivery == "queue":
            from ..queue.transaction import QueueTransaction

            if self.queue is None:
                raise Refusal("unavailable", "the outbound queue is not running; try again "
                              "later")
            return Opened(account, QueueTransaction(account, self.queue),
                          self.settings.smtp.max_message_size or DEFAULT_SIZE)
        upstream = self.pool.take(account.key)
        if upstream is None:
            upstream = SmtpUpstreamSession(account)
            await self.gate.relogin(account, upstream)
        return Opened(account, Relay(account, upstream, self.gate, self.settings, self.pool),
                      upstream.size_limit, frozenset(upstream.extensions))

    # -- the listener --------------------------------------------------------------------

    def _make(self, implicit: bool = False) -> SmtpFront:
        tls: dict[str, Any] = {}
        if self.tls is not None and not implicit:  # implicit TLS: nothing to offer or require
            listener = self.settings.smtp
            tls = {"tls_context": self.tls.current(listener.tls_min_version),
                   "tls_required": listener.plain_requires_tls}
        front = SmtpFront(self.settings, self.hostname, self,
                          self.fronts.discard, self.limits, observer=self.gate.observer, **tls)
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
                front.close_now()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self.pool.close()
