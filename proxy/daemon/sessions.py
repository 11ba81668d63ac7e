"""The daemon's IMAP and POP3 sessions: a connection and its TLS per accept, the limits that
admit or refuse it, its log context and end, the shutdown grace, and freed memory given back."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from .. import logs
from ..config import Settings
from ..login import Gate
from ..net import Conn, peer_host
from ..tls.contexts import ServerTls
from ..tls.listener import ClientTls
from . import memory
from .limits import ConnectionLimits, refuse
from .memory import ReleasePolicy, collect_garbage
from .metrics import Metrics

if TYPE_CHECKING:
    from ..sessions.spare import SpareSessions
    from ..smtp.service import SmtpService

log = logging.getLogger("mailproxy")
session_log = logging.getLogger("mailproxy.session")

# Freed memory goes back to the system when a crowd of sessions has ended and none is open
# (checked this often), or at most this often while sessions come and go (ReleasePolicy).
MEMORY_CHECK_INTERVAL = 5.0
MEMORY_RELEASE_INTERVAL = 60.0
RELEASE_REPORTED = 16 * 2**20  # a release that gives this much back is logged at info
MiB = 2**20

Session = Callable[[Gate, Settings, Conn, ClientTls], Awaitable[None]]


class Daemon(Protocol):
    """What the guard needs of the daemon (``server.Daemon``); read at each use, since a
    reload replaces ``settings`` and ``tls``."""

    settings: Settings
    tls: ServerTls
    gate: Gate
    limits: dict[str, ConnectionLimits]
    metrics: Metrics
    spares: SpareSessions
    smtp: SmtpService


class SessionGuard:
    """The IMAP and POP3 session tasks of the daemon, one per connection to a listener of
    ``start``: counted while open (``open``, ``ended``), cut off after a grace at shutdown
    (``drain``)."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self.tasks: set[asyncio.Task[None]] = set()
        self.open: dict[str, int] = {"imap": 0, "pop3": 0}
        self.ended = 0  # sessions ended, for the memory release
        self._refused_logged = 0.0

    async def start(self, proto: str, implicit: bool, host: str, port: int,
                    backlog: int) -> asyncio.Server:
        """A listener of ``proto`` ("imap", "pop3"; ``implicit``: TLS first) on host:port."""
        return await asyncio.get_running_loop().create_server(
            self._factory(proto, implicit), host, port, backlog=backlog, reuse_address=True)

    def _factory(self, proto: str, implicit: bool) -> Callable[[], Conn]:
        from ..sessions.imap import imap_session
        from ..sessions.pop3 import pop3_session

        sessions: dict[str, Session] = {
            "imap": functools.partial(imap_session, spares=self._daemon.spares),
            "pop3": pop3_session}
        session = sessions[proto]

        def make() -> Conn:
            # The TLS settings of this moment: a reload reaches the next connection.
            daemon = self._daemon
            listener = getattr(daemon.settings, proto)
            tls = ClientTls(daemon.tls, listener.tls_min_version, implicit=implicit,
                            required=implicit or listener.plain_requires_tls)
            conn = Conn(tls_first=implicit)
            task = asyncio.get_running_loop().create_task(
                self._guard(proto, session, conn, tls))
            self.tasks.add(task)
            task.add_done_callback(self._session_done)
            return conn

        return make

    def _session_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.ended += 1

    async def _guard(self, proto: str, session: Session, conn: Conn, tls: ClientTls) -> None:
        # The protocol factory runs before the transport is attached.
        await conn.connected
        host = peer_host(conn)
        daemon = self._daemon
        limits = daemon.limits[proto]
        if not limits.admit(host):
            assert conn.transport is not None
            refuse(conn.transport, proto)
            self._log_refused(proto, host)
            return
        assert conn.transport is not None
        # This task's context: every line the session logs carries its peer and id.
        logs.begin_session(proto, conn.transport.get_extra_info("peername"))
        started = time.monotonic()
        session_log.debug("session started")
        self.open[proto] += 1
        try:
            await session(daemon.gate, daemon.settings, conn, tls)
        except asyncio.CancelledError:
            conn.abort()
            raise
        except Exception:
            log.exception("%s session failed", proto)
            conn.abort()
        finally:
            limits.release(host)
            self.open[proto] -= 1
            counts = conn.counts or logs.tcp_counts(conn.transport)
            conn.close()
            logs.log_session_end(session_log, started, counts)
            if counts is not None:  # the kernel's counters, read as the connection went
                daemon.metrics.session_ended(proto, *counts)

    def _log_refused(self, proto: str, host: str) -> None:
        now = time.monotonic()
        if now - self._refused_logged >= 10.0:  # not a line per connection of a flood
            self._refused_logged = now
            log.warning("%s: connection from %s refused: too many connections", proto, host)

    async def drain(self, grace: float) -> None:
        """Give open sessions ``grace`` seconds to finish, then cut them off."""
        if not self.tasks:
            return
        _, pending = await asyncio.wait(set(self.tasks), timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def release_memory(self) -> None:
        """Hand memory freed by ended sessions (these and SMTP's) back to the system
        (``memory.ReleasePolicy`` says when), so RSS goes back down after a crowd of clients
        leaves."""
        policy = ReleasePolicy(MEMORY_RELEASE_INTERVAL)
        while True:
            await asyncio.sleep(MEMORY_CHECK_INTERVAL)
            smtp = self._daemon.smtp
            ended = self.ended + smtp.ended
            open_sessions = sum(self.open.values()) + len(smtp.fronts)
            if policy.due(ended, open_sessions):
                policy.released(ended)
                started = time.monotonic()
                collect_garbage(open_sessions)  # on the loop: it holds the GIL anyway
                before, after = await asyncio.to_thread(memory.release)
                log.log(logging.INFO if before - after >= RELEASE_REPORTED else logging.DEBUG,
                        "gave %.0f MiB of memory back to the system (RSS %.0f -> %.0f MiB, "
                        "%d sessions open) in %.0f ms", (before - after) / MiB, before / MiB,
                        after / MiB, open_sessions, (time.monotonic() - started) * 1000)
