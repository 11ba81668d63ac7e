"""The daemon's SMTP listener: one ``SmtpFront`` per connection, the transaction each session
gets (``Relay`` to its upstream, or the outbound queue: ``[smtp] delivery`` and the device
rules decide), the pool of logged-in upstream sessions, and draining at shutdown."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import Account, Delivery, Device, Settings
from ..daemon.limits import ConnectionLimits
from ..login import Gate, Refusal
from ..net import describe_error, peer_name
from ..tls.contexts import ServerTls
from ..tls.listener import HANDSHAKE_TIMEOUT, accept_implicit
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
        self.ended = 0  # connections ended, for the daemon's memory release
        self._handshakes: set[asyncio.Task[None]] = set()  # implicit TLS, before the front
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
        front = SmtpFront(self.settings, self.hostname, self, self._lost, self.limits,
                          observer=self.gate.observer, **tls)
        self.fronts.add(front)
        return front

    def _lost(self, front: SmtpFront) -> None:
        self.fronts.discard(front)
        self.ended += 1

    async def start(self, host: str, port: int, backlog: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(self._make, host, port, backlog=backlog,
                                        reuse_address=True)

    async def start_implicit(self, host: str, port: int, backlog: int) -> asyncio.Server:
        """The implicit-TLS listener (RFC 8314): accepted in the clear, each handshake with the
        context current then (certificate on disk, ``tls_min_version`` after a reload)."""
        assert self.tls is not None
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _TlsFirst(self._handshake), host, port,
                                        backlog=backlog, reuse_address=True)

    def _handshake(self, transport: asyncio.Transport) -> None:
        task = asyncio.get_running_loop().create_task(self._implicit(transport))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _implicit(self, transport: asyncio.Transport) -> None:
        assert self.tls is not None
        peer = peer_name(transport)
        try:
            context = await self.tls.context(self.settings.smtp.tls_min_version)
        except BaseException:
            transport.abort()
            raise
        try:
            await accept_implicit(transport, context, HANDSHAKE_TIMEOUT,
                                  lambda: self._make(implicit=True))
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            log.info("smtp: TLS handshake with %s failed: %s", peer, describe_error(exc))
        except Exception:
            log.exception("smtp: implicit TLS connection from %s failed", peer)
            transport.abort()

    async def drain(self, grace: float) -> None:
        """Let sessions in progress finish for ``grace`` seconds, then cut them off."""
        handshakes = list(self._handshakes)
        for handshake in handshakes:  # not a session yet: no grace
            handshake.cancel()
        await asyncio.gather(*handshakes, return_exceptions=True)
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


class _TlsFirst(asyncio.Protocol):
    """An implicit-TLS connection until its handshake starts: the ClientHello stays in the
    socket for the TLS layer (``tls.listener.accept_implicit``)."""

    def __init__(self, start: Callable[[asyncio.Transport], None]) -> None:
        self._start = start

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self._start(transport)
