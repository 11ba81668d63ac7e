"""The daemon: listeners, the background token refresher, sessions, reload, and a clean
shutdown (with systemd notifications and metrics when configured)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from .. import __version__
from ..admin.host import admin_service
from ..admin.model import LINK_COMMAND
from ..config import Account, Settings, load_config, parse_hostport
from ..login import Gate, authorize_hint
from ..net import Conn
from ..tokens.keys import load_master_key
from ..tokens.manager import TokenManager
from ..vault import Vault, VaultError
from .control import ControlServer
from .metrics import Metrics, MetricsServer
from .notify import Event, EventName, Notifier, event_key
from .reload import Loader, Reloader
from .systemd import SystemdNotifier

log = logging.getLogger("mailproxy")

LISTEN_BACKLOG = 4096
# Everything from SIGTERM to exit fits in this (the unit's TimeoutStopSec is 20 s): sessions get
# `shutdown_grace`, then a token request on the wire gets what is left.
STOP_BUDGET = 18.0

Session = Callable[[Gate, Settings, Conn], Awaitable[None]]


class Daemon:
    def __init__(self, settings: Settings, gate: Gate | None = None, *,
                 config_path: Path | None = None, loader: Loader | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        from ..smtp import SmtpService

        self.settings = settings
        if gate is None:
            gate = make_gate(settings)
        self.gate = gate
        self.notifier = _notifier(settings)
        gate.tokens.set_event_sink(self._on_event)
        self.control = ControlServer(settings.control_path, self._control,
                                     commands=("status", "reload", LINK_COMMAND))
        self.started = time.time()
        # Per account: the notifications sent by this process (event, time, results).
        self.sent: dict[str, list[dict[str, Any]]] = {}
        self.servers: dict[str, asyncio.Server] = {}
        self.smtp = SmtpService(gate, settings)
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._sessions: set[asyncio.Task[None]] = set()
        self._open: dict[str, int] = {"imap": 0, "pop3": 0}
        self.metrics = Metrics()
        gate.observer = self.metrics
        gate.tokens.source.outcome = self.metrics.token_request
        self.metrics.watch_tokens(lambda: self.settings.accounts, lambda: self.gate.tokens)
        for proto in self._open:
            self.metrics.count_sessions(proto, functools.partial(self._open.__getitem__, proto))
        self.metrics.count_sessions("smtp", lambda: len(self.smtp.fronts))
        self.metrics_server = MetricsServer(self.metrics, self.not_ready)
        self.systemd = SystemdNotifier(env)
        self.reloader = Reloader(self, loader or (lambda: load_config(config_path)[0]))
        self._retired_notifiers: list[Notifier] = []
        self.admin = admin_service(self)

    def stop(self) -> None:
        self._stop.set()

    def address(self, proto: str) -> tuple[str, int]:
        sock = self.servers[proto].sockets[0]
        host, port = sock.getsockname()[:2]
        return host, port

    async def run(self) -> None:
        # The single-instance lock before anything else: a second daemon must not bind, open
        # vaults or refresh tokens (a rotated refresh token used twice is lost).
        self.control.lock()
        try:
            await self._run()
        finally:
            await self.control.aclose()
            await self.metrics_server.aclose()
            self.systemd.close()

    async def _run(self) -> None:
        settings = self.settings
        try:
            self.servers.update(await self.bind_listeners(
                {proto: getattr(settings, proto).listen for proto in ("imap", "pop3", "smtp")},
                settings))
            if settings.metrics.listen:
                await self.metrics_server.start(settings.metrics.listen)
        except BaseException:
            for server in self.servers.values():
                server.close()
            raise
        for proto in self.servers:
            log.info("%s listening on %s:%d", proto, *self.address(proto))
        await asyncio.to_thread(self.open_vaults, settings.accounts)
        await self.control.start()
        self._report_accounts()
        async with asyncio.TaskGroup() as tg:
            background = [tg.create_task(self.gate.tokens.run(), name="token-refresher"),
                          tg.create_task(self.reloader.run(), name="reloader"),
                          tg.create_task(self.systemd.run(self.status_line), name="systemd")]
            if self.admin is not None:
                await self.admin.start()
                background.append(tg.create_task(self.admin.serve(), name="admin-page"))
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
            await asyncio.gather(self._drain(grace), self.smtp.drain(grace))
        # Let a token request already on the wire finish, so a rotated token is not lost.
        await self.gate.tokens.finish_requests(STOP_BUDGET - (time.monotonic() - stopping))
        await self.gate.tokens.aclose()
        for notifier in [*self._retired_notifiers, self.notifier]:
            await notifier.aclose()

    async def bind_listeners(self, listen: Mapping[str, str],
                             settings: Settings) -> dict[str, asyncio.Server]:
        """Listening servers for ``{proto: "host:port"}``; all or none (OSError)."""
        from ..sessions.imap import imap_session
        from ..sessions.pop3 import pop3_session

        sessions: dict[str, Session] = {"imap": imap_session, "pop3": pop3_session}
        loop = asyncio.get_running_loop()
        opened: dict[str, asyncio.Server] = {}
        try:
            for proto, where in listen.items():
                host, port = parse_hostport(where)
                if proto == "smtp":
                    # aiosmtpd brings its own protocol class; the service drains its sessions.
                    opened[proto] = await self.smtp.start(host, port, backlog=LISTEN_BACKLOG)
                else:
                    opened[proto] = await loop.create_server(
                        self._factory(proto, sessions[proto]), host, port,
                        backlog=LISTEN_BACKLOG, reuse_address=True)
        except OSError:
            for server in opened.values():
                server.close()
            raise
        return opened

    def apply_settings(self, settings: Settings, opened: Mapping[str, asyncio.Server]) -> None:
        """A reload's commit: new sessions get ``settings``; moved listeners are swapped
        (sessions accepted by the old one go on)."""
        self.settings = self.gate.settings = self.smtp.settings = settings
        for proto, server in opened.items():
            old = self.servers.get(proto)
            self.servers[proto] = server
            if old is not None:
                old.close()
            log.info("%s listening on %s:%d", proto, *self.address(proto))
        logging.getLogger("mailproxy").setLevel(settings.log_level.upper())

    async def restart_metrics(self, listen: str) -> None:
        """Serve the metrics on ``listen`` ("" turns them off); OSError leaves them as were."""
        fresh = MetricsServer(self.metrics, self.not_ready)
        if listen:
            await fresh.start(listen)
        old, self.metrics_server = self.metrics_server, fresh
        await old.aclose()

    async def replace_notifier(self, settings: Settings) -> None:
        # The old one may still be running a command for an event: closed at shutdown.
        self._retired_notifiers.append(self.notifier)
        self.notifier = _notifier(settings)

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
        source = self.gate.tokens.source
        out = []
        for account in self.settings.accounts:
            try:
                if source.last_state(account.key).needs_authorization:
                    out.append(account.address)
            except KeyError:
                continue
        return out

    def status_line(self) -> str:
        sessions = sum(self._open.values()) + len(self.smtp.fronts)
        attention = self.needing_attention()
        count = len(self.settings.accounts)
        accounts = (f"{len(attention)} need attention: " + ", ".join(attention) if attention
                    else "all authorized")
        return (f"{sessions} session{'' if sessions == 1 else 's'}; "
                f"{count} account{'' if count == 1 else 's'}, {accounts}")

    async def _on_event(self, account: Account, name: str, reason: str,
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
                if not await asyncio.to_thread(self.gate.vault.mark_notified, account.key, mark):
                    return  # sent before, maybe by an earlier run of the daemon
            except (OSError, ValueError, VaultError) as exc:
                log.warning("%s: cannot record the notification: %s", account.address, exc)
        results = await self.notifier.send(event)
        self.sent.setdefault(account.key, []).append(
            {"event": name, "at": event.at, "results": results})

    async def _control(self, command: str) -> dict[str, Any]:
        if command == "reload":
            return await self.reloader.ask()
        if command == LINK_COMMAND:
            if self.admin is None:
                return {"error": "the admin page is off ([admin] listen is empty)"}
            return self.admin.link()
        return await self.status_report()

    async def status_report(self) -> dict[str, Any]:
        """Every account as the token manager knows it: `mailproxy status` and the admin page."""
        accounts = []
        for account in self.settings.accounts:
            status = self.gate.tokens.status(account.key)
            try:
                slots = await asyncio.to_thread(self.gate.vault.slots, account.key)
                meta = await asyncio.to_thread(self.gate.vault.meta, account.key)
            except (OSError, ValueError):
                slots, meta = [], {}
            status["passwords"] = sum(1 for s in slots if s.type != "master")
            status["master_key_slot"] = any(s.type == "master" for s in slots)
            status["notifications"] = meta.get("notified") or {}
            status["sent_this_run"] = self.sent.get(account.key, [])
            accounts.append(status)
        return {"pid": os.getpid(), "version": __version__, "started": self.started,
                "accounts": accounts}

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

    def _report_accounts(self) -> None:
        """Say at start-up what each account still needs, before a client finds out."""
        vault = self.gate.vault
        for account in self.settings.accounts:
            if not vault.exists(account.key) and not vault.has_legacy(account.key):
                log.warning("account %s is not authorized yet: %s", account.address,
                            authorize_hint(account))
                continue
            status = self.gate.tokens.status(account.key)
            if status["locked"]:
                log.info("account %s: token vault locked until the first client login",
                         account.address)
            elif not status["authorized"]:
                log.warning("account %s is not authorized (%s): %s", account.address,
                            status["needs_authorization"], authorize_hint(account))

    def _factory(self, proto: str, session: Session) -> Callable[[], Conn]:
        def make() -> Conn:
            conn = Conn()
            conn.count_bytes = True
            task = asyncio.get_running_loop().create_task(self._guard(proto, session, conn))
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)
            return conn

        return make

    async def _guard(self, proto: str, session: Session, conn: Conn) -> None:
        # The protocol factory runs before the transport is attached.
        await conn.connected
        self._open[proto] += 1
        try:
            await session(self.gate, self.settings, conn)
        except asyncio.CancelledError:
            conn.abort()
            raise
        except Exception:
            log.exception("%s session failed", proto)
            conn.abort()
        finally:
            self._open[proto] -= 1
            conn.close()
            # The kernel's counters, read as the connection goes (its end is the edge).
            conn.closed.add_done_callback(functools.partial(self._ended, proto, conn))

    def _ended(self, proto: str, conn: Conn, _: object) -> None:
        if conn.byte_counts is not None:
            self.metrics.session_ended(proto, *conn.byte_counts)

    async def _drain(self, grace: float) -> None:
        """Give open sessions ``grace`` seconds to finish, then cut them off."""
        if not self._sessions:
            return
        _, pending = await asyncio.wait(set(self._sessions), timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _notifier(settings: Settings) -> Notifier:
    master = settings.vault.master_key or ""
    return Notifier(settings.notify, drop_env=[master[4:]] if master.startswith("env:") else [])


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
