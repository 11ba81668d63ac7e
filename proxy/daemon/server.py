"""The daemon: listeners, the background token refresher, reload, and a clean shutdown (with
systemd notifications and metrics when configured); its IMAP and POP3 sessions are in
``sessions``, its notifications in ``notices``, what it says about itself in ``report``."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..admin.host import ADMIN_TLS_VERSION, admin_service
from ..admin.model import LINK_COMMAND
from ..config import Account, Settings, TlsVersion, load_config, parse_hostport
from ..login import Gate
from ..tls.contexts import ServerTls, startup_warnings
from ..tls.memory import raise_open_file_limit, share_tls_read_buffer
from ..tokens.keys import load_master_key
from ..tokens.manager import TokenManager
from ..vault import Vault
from . import report
from .control import AlreadyRunning, ControlError, ControlServer
from .limits import BUSY, ConnectionLimits, QuietResourceErrors
from .metrics import Metrics, MetricsServer
from .notices import Notices
from .reload import Loader, Reloader, listeners, tls_versions
from .sessions import SessionGuard
from .startup import EXIT_CONFIG, EXIT_CONFLICT, StartupError, bind_error, check_state_dir
from .systemd import SystemdNotifier

if TYPE_CHECKING:
    from ..queue.service import QueueService

log = logging.getLogger("mailproxy")

LISTEN_BACKLOG = 4096
# Everything from SIGTERM to exit fits in this (the unit's TimeoutStopSec is 20 s): sessions get
# `shutdown_grace`, then a token request on the wire gets what is left.
STOP_BUDGET = 18.0
# How often the TLS certificate files are looked at without a connection asking.
TLS_CHECK_INTERVAL = 60.0


class Daemon:
    def __init__(self, settings: Settings, gate: Gate | None = None, *,
                 config_path: Path | None = None, loader: Loader | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        from ..sessions.spare import SpareSessions
        from ..smtp import SmtpService

        self.settings = settings
        self.config_path = config_path
        if gate is None:
            gate = make_gate(settings)
        self.gate = gate
        self.notices = Notices(settings, gate)  # the [notify] hook and what it was sent
        gate.tokens.set_event_sink(self._on_event)
        self.control = ControlServer(settings.control_path, self._control,
                                     commands=("status", "reload", LINK_COMMAND))
        self.started = time.time()
        self.servers: dict[str, asyncio.Server] = {}
        self.limits = {proto: ConnectionLimits(listener.max_connections,
                                               listener.max_connections_per_ip)
                       for proto, listener in (("imap", settings.imap), ("pop3", settings.pop3),
                                               ("smtp", settings.smtp))}
        self.smtp = SmtpService(gate, settings, None, self.limits["smtp"])
        self.spares = SpareSessions(gate, settings)  # logged-in IMAP sessions made ahead
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self.guard = SessionGuard(self)  # the IMAP and POP3 sessions
        self.metrics = Metrics()
        gate.observer = self.metrics
        gate.tokens.source.outcome = self.metrics.token_request
        self.metrics.watch_tokens(lambda: self.settings.accounts, lambda: self.gate.tokens)
        for proto in self.guard.open:
            self.metrics.count_sessions(proto,
                                        functools.partial(self.guard.open.__getitem__, proto))
        self.metrics.count_sessions("smtp", lambda: len(self.smtp.fronts))
        self.metrics_server = MetricsServer(self.metrics, self.not_ready)
        self.systemd = SystemdNotifier(env)
        self.reloader = Reloader(self, loader or (lambda: load_config(config_path)[0]))
        self.tls = ServerTls(settings, versions=_tls_versions(settings))
        self.smtp.tls = self.tls
        self.admin = admin_service(self)
        self.queue: QueueService | None = None
        self.metrics.watch_queue(lambda: self.settings.accounts,
                                 lambda: self.queue.summary() if self.queue is not None else {})
        self._resources: QuietResourceErrors | None = None  # while running

    def stop(self) -> None:
        self._stop.set()

    def address(self, proto: str) -> tuple[str, int]:
        sock = self.servers[proto].sockets[0]
        host, port = sock.getsockname()[:2]
        return host, port

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        quiet = self._resources = QuietResourceErrors(loop)
        quiet.install()
        before, after = raise_open_file_limit()
        if after != before:
            log.info("open file limit raised from %d to %d", before, after)
        share_tls_read_buffer()
        # The single-instance lock before anything else: a second daemon must not bind, open
        # vaults or refresh tokens (a rotated refresh token used twice is lost).
        try:
            await asyncio.to_thread(check_state_dir, self.settings.state_dir)
            try:
                self.control.lock()
            except AlreadyRunning as exc:
                raise StartupError(f"{exc}; stop it first, or give this one its own state_dir",
                                   EXIT_CONFLICT) from None
            except ControlError as exc:
                raise StartupError(str(exc), EXIT_CONFIG) from None
            # The queue is recovered (interrupted receptions swept, deliveries in flight back
            # in the queue) before any client can connect.
            queue = await self._start_queue()
            self.smtp.queue = queue
            try:
                await self._run(queue)
            finally:
                if queue is not None:
                    await queue.aclose()
        finally:
            await self.control.aclose()
            await self.metrics_server.aclose()
            self.systemd.close()
            quiet.uninstall()

    async def _run(self, queue: QueueService | None) -> None:
        settings = self.settings
        for warning in startup_warnings(settings):
            log.warning("%s", warning)
        await self.tls.start()
        try:
            self.servers.update(await self.bind_listeners(listeners(settings), settings))
            if settings.metrics.listen:
                await self.metrics_server.start(settings.metrics.listen)
        except BaseException:
            for server in self.servers.values():
                server.close()
            raise
        await self.control.start()
        report.banner(self.config_path, self.settings,
                      {name: self.address(name) for name in self.servers})
        async with asyncio.TaskGroup() as tg:
            await asyncio.to_thread(self.open_vaults, settings.accounts)
            report.accounts_at_start(self.settings, self.gate.vault, self.gate.tokens)
            background = [tg.create_task(self.gate.tokens.run(), name="token-refresher"),
                          tg.create_task(self.reloader.run(), name="reloader"),
                          tg.create_task(self.systemd.run(self.status_line), name="systemd"),
                          tg.create_task(self._check_certificates(), name="tls-reload"),
                          tg.create_task(self.guard.release_memory(), name="memory-release"),
                          tg.create_task(self.spares.run(), name="imap-spares")]
            if self.admin is not None:
                await self.admin.start()
                background.append(tg.create_task(self.admin.serve(), name="admin-page"))
            # Stopped after the sessions: a message being received may still get its 250.
            senders = [tg.create_task(self.smtp.pool.run(), name="smtp-pool")]
            if queue is not None:
                senders.append(tg.create_task(queue.run(), name="queue"))
            self.ready.set()
            self.systemd.ready(self.status_line())
            await self._stop.wait()
            stopping = time.monotonic()
            self.systemd.stopping()
            log.info("shutting down")
            for server in self.servers.values():
                server.close()
            for task in background:
                task.cancel()
            grace = self.settings.shutdown_grace
            await asyncio.gather(self.guard.drain(grace), self.smtp.drain(grace))
            for task in senders:
                task.cancel()
        # Let a token request already on the wire finish, so a rotated token is not lost.
        await self.gate.tokens.finish_requests(STOP_BUDGET - (time.monotonic() - stopping))
        await self.gate.tokens.aclose()
        await self.notices.aclose()

    async def bind_listeners(self, listen: Mapping[str, str],
                             settings: Settings) -> dict[str, asyncio.Server]:
        """Listening servers for ``{name: "host:port"}`` ("imap", "imaps", ...); all or none
        (a StartupError naming the listener and what to do)."""
        opened: dict[str, asyncio.Server] = {}
        name, host, port = "", "", 0
        try:
            for name, where in listen.items():
                # "imaps", "pop3s", "smtps": the implicit-TLS listener of that protocol.
                implicit = name.endswith("s")
                proto = name[:-1] if implicit else name
                host, port = parse_hostport(where)
                if proto == "smtp":
                    # aiosmtpd brings its own protocol class; the service drains its sessions.
                    start = self.smtp.start_implicit if implicit else self.smtp.start
                    opened[name] = await start(host, port, backlog=LISTEN_BACKLOG)
                else:
                    opened[name] = await self.guard.start(proto, implicit, host, port,
                                                          LISTEN_BACKLOG)
                if self._resources is not None:  # out of descriptors: "try again later"
                    self._resources.listen(opened[name], b"" if implicit else BUSY[proto])
        except OSError as exc:
            for server in opened.values():
                server.close()
            raise bind_error(name, host, port, exc) from None
        return opened

    async def prepare_tls(self, settings: Settings) -> ServerTls:
        """Server contexts for ``settings`` (a reload's [tls] or a new tls_min_version);
        raises TlsSetupError."""
        tls = ServerTls(settings, versions=_tls_versions(settings))
        await tls.start()
        return tls

    def apply_settings(self, settings: Settings, opened: Mapping[str, asyncio.Server],
                       tls: ServerTls | None = None) -> None:
        """A reload's commit: new sessions get ``settings`` (and ``tls``, new contexts); moved
        listeners are swapped, those no longer configured closed (sessions accepted by an old
        one go on)."""
        self.settings = self.gate.settings = self.smtp.settings = settings
        self.spares.reconfigure(settings)
        if tls is not None:
            self.tls = self.smtp.tls = tls
        for name, server in opened.items():
            old = self.servers.get(name)
            self.servers[name] = server
            if old is not None:
                old.close()
            log.info("%s listening on %s:%d", name, *self.address(name))
        wanted = listeners(settings)
        for name in [name for name in self.servers if name not in wanted]:
            self.servers.pop(name).close()
            log.info("%s listener closed", name)
        logging.getLogger("mailproxy").setLevel(settings.log_level.upper())

    async def restart_metrics(self, listen: str) -> None:
        """Serve the metrics on ``listen`` ("" turns them off); OSError leaves them as were."""
        fresh = MetricsServer(self.metrics, self.not_ready)
        if listen:
            await fresh.start(listen)
        old, self.metrics_server = self.metrics_server, fresh
        await old.aclose()

    async def replace_notifier(self, settings: Settings) -> None:
        self.notices.replace(settings)

    def not_ready(self) -> str | None:
        """Why the daemon is not ready (for /readyz), or None. Local checks only."""
        if not self.ready.is_set():
            return "starting"
        if self._stop.is_set():
            return "stopping"
        down = [proto for proto, server in self.servers.items() if not server.is_serving()]
        if down:
            return "listener not serving: " + ", ".join(down)
        if not os.access(self.settings.state_dir, os.W_OK):
            return f"state directory {self.settings.state_dir} is not writable"
        return None

    def needing_attention(self) -> list[str]:
        """Accounts whose grant a person must renew, as last known (no disk access)."""
        return report.needing_attention(self.settings, self.gate.tokens)

    def status_line(self) -> str:
        sessions = sum(self.guard.open.values()) + len(self.smtp.fronts)
        return report.status_line(sessions, self.settings, self.gate.tokens)

    def _uses_queue(self) -> bool:
        settings = self.settings
        return (settings.smtp.delivery == "queue"
                or any(d.delivery == "queue" for d in settings.devices)
                or (settings.queue_dir / "index.sqlite").exists())  # messages left to send

    async def _start_queue(self) -> QueueService | None:
        if not await asyncio.to_thread(self._uses_queue):
            return None
        from ..queue.deliver import SmtpDeliverer
        from ..queue.service import QueueService

        queue = QueueService(self.settings, SmtpDeliverer(self.gate),
                             notify=self.notices.message_failed,
                             hostname=socket.gethostname() or "localhost")
        await queue.start()
        self.queue = queue
        recovery = queue.recovery
        log.info("outbound queue in %s%s", self.settings.queue_dir,
                 f" ({recovery.requeued} message(s) to send)" if recovery and recovery.requeued
                 else "")
        return queue

    async def _on_event(self, account: Account, name: str, reason: str,
                        deadline: float | None) -> None:
        """A token event from the manager: its notification (``notices``)."""
        if name == "authorization_required":
            self.spares.drop(account.key)  # logged in with a grant that is no more
        await self.notices.token_event(account, name, reason, deadline)

    async def _control(self, command: str) -> dict[str, Any]:
        if command == "reload":
            return await self.reloader.ask()
        if command == LINK_COMMAND:
            if self.admin is None:
                return {"error": "the admin page is off ([admin] listen is empty)"}
            return await self.admin.link()
        return await self.status_report()

    async def status_report(self) -> dict[str, Any]:
        """Every account as the token manager knows it: `mailproxy status` and the admin page."""
        queued = await self.queue.status() if self.queue is not None else {}
        return {"pid": os.getpid(), "version": __version__, "started": self.started,
                "accounts": await report.account_statuses(
                    self.settings, self.gate.tokens, self.gate.vault, queued, self.notices.sent)}

    def open_vaults(self, accounts: Sequence[Account]) -> None:
        """Migrate the earlier plain store and, with a master key, open these vaults now."""
        vault = self.gate.vault
        if vault.sweep_temporary():
            log.info("removed temporary files left by an interrupted write")
        for account in accounts:
            try:
                vault.migrate(account.key)
                if vault.has_master_key and vault.exists(account.key):
                    if vault.open_with_master(account.key):
                        vault.ensure_master_slot(account.key)
                    else:
                        log.warning("account %s: the master key does not open its vault (a "
                                    "different key?); it opens at the first client login and "
                                    "gets a slot for this key then", account.address)
            except (OSError, ValueError) as exc:
                log.error("account %s: token vault unusable: %s", account.address, exc)

    async def _check_certificates(self) -> None:
        """Renewal and a replaced file do not wait for a client (the contexts of now: a
        reload may replace them)."""
        while True:
            await asyncio.sleep(TLS_CHECK_INTERVAL)
            await self.tls.refresh()


def _tls_versions(settings: Settings) -> list[TlsVersion]:
    """The three protocols' oldest TLS versions, and the admin page's."""
    return [*sorted(tls_versions(settings)), ADMIN_TLS_VERSION]


def make_gate(settings: Settings) -> Gate:
    """The vault and the token manager for ``settings``; raises ``MasterKeyError``."""
    master = load_master_key(settings.vault.master_key) if settings.vault.master_key else None
    vault = Vault(settings.state_dir, master_key=master)
    tokens = TokenManager(settings.accounts, vault, settings.tokens,
                          failure_threshold=settings.notify.failure_threshold,
                          deadline_lead=settings.notify.before_deadline * 3600.0)
    return Gate(settings, vault, tokens)


async def serve(settings: Settings, config_path: Path | None = None) -> None:
    daemon = Daemon(settings, config_path=config_path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.reloader.request)
    await daemon.run()
