"""The daemon: listeners, the background token refresher, sessions, and a clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from .. import __version__
from ..config import Account, Settings, parse_hostport
from ..login import Gate, authorize_hint
from ..net import Conn
from ..tls.contexts import ServerTls, startup_warnings
from ..tls.listener import ClientTls
from ..tls.memory import raise_open_file_limit, release_free_memory, share_tls_read_buffer
from ..tokens.keys import load_master_key
from ..tokens.manager import TokenManager
from ..vault import Vault, VaultError
from .control import ControlServer
from .notify import Event, EventName, Notifier, event_key

log = logging.getLogger("mailproxy")

LISTEN_BACKLOG = 4096
SHUTDOWN_GRACE = 5.0
# How often freed memory is handed back to the system, when sessions ended since.
MEMORY_RELEASE_INTERVAL = 60.0

Session = Callable[[Gate, Settings, Conn, ClientTls], Awaitable[None]]


class Daemon:
    def __init__(self, settings: Settings, gate: Gate | None = None) -> None:
        self.settings = settings
        if gate is None:
            gate = make_gate(settings)
        self.gate = gate
        master = settings.vault.master_key or ""
        self.notifier = Notifier(settings.notify, drop_env=[master[4:]] if master.startswith(
            "env:") else [])
        gate.tokens.set_event_sink(self._on_event)
        self.control = ControlServer(settings.control_path, self._control)
        self.started = time.time()
        # Per account: the notifications sent by this process (event, time, results).
        self.sent: dict[str, list[dict[str, Any]]] = {}
        self.servers: dict[str, asyncio.Server] = {}
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._sessions: set[asyncio.Task[None]] = set()
        self._ended = 0  # sessions ended since memory was last released
        self.tls = ServerTls(settings)

    def stop(self) -> None:
        self._stop.set()

    def address(self, proto: str) -> tuple[str, int]:
        sock = self.servers[proto].sockets[0]
        host, port = sock.getsockname()[:2]
        return host, port

    async def run(self) -> None:
        from ..sessions.imap import imap_session
        from ..sessions.pop3 import pop3_session
        from ..smtp import SmtpService

        loop = asyncio.get_running_loop()
        before, after = raise_open_file_limit()
        if after != before:
            log.info("open file limit raised from %d to %d", before, after)
        share_tls_read_buffer()
        for warning in startup_warnings(self.settings):
            log.warning("%s", warning)
        await self.tls.start()
        sessions: dict[str, Session] = {"imap": imap_session, "pop3": pop3_session}
        async with asyncio.TaskGroup() as tg:
            for proto, session in sessions.items():
                listener = getattr(self.settings, proto)
                version = listener.tls_min_version
                addresses = [(proto, listener.listen, ClientTls(
                    self.tls, version, implicit=False, required=listener.plain_requires_tls))]
                if listener.tls_listen:
                    addresses.append((proto + "s", listener.tls_listen, ClientTls(
                        self.tls, version, implicit=True, required=True)))
                for name, listen, tls in addresses:
                    host, port = parse_hostport(listen)
                    self.servers[name] = await loop.create_server(
                        self._factory(proto, session, tls), host, port,
                        backlog=LISTEN_BACKLOG, reuse_address=True)
                    log.info("%s listening on %s:%d%s", proto, *self.address(name),
                             " (TLS)" if tls.implicit else "")
            # aiosmtpd brings its own protocol class: its connections are drained by the service.
            smtp = SmtpService(self.gate, self.settings, self.tls)
            self.servers["smtp"] = await smtp.start(
                *parse_hostport(self.settings.smtp.listen), backlog=LISTEN_BACKLOG)
            log.info("smtp listening on %s:%d", *self.address("smtp"))
            if self.settings.smtp.tls_listen:
                self.servers["smtps"] = await smtp.start_implicit(
                    *parse_hostport(self.settings.smtp.tls_listen), backlog=LISTEN_BACKLOG)
                log.info("smtp listening on %s:%d (TLS)", *self.address("smtps"))
            await asyncio.to_thread(self._open_vaults)
            await self.control.start()
            self._report_accounts()
            refresher = tg.create_task(self.gate.tokens.run(), name="token-refresher")
            housekeeping = [tg.create_task(self.tls.run(), name="tls-reload"),
                            tg.create_task(self._release_memory(), name="memory-release")]
            self.ready.set()
            await self._stop.wait()
            log.info("shutting down")
            for server in self.servers.values():
                server.close()
            refresher.cancel()
            for task in housekeeping:
                task.cancel()
            await asyncio.gather(self._drain(), smtp.drain(SHUTDOWN_GRACE),
                                 self.control.aclose())
        # Let a token request already on the wire finish, so a rotated token is not lost.
        await self.gate.tokens.aclose()
        await self.notifier.aclose()

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

    def _open_vaults(self) -> None:
        """Migrate the earlier plain store and, with a master key, open every vault now."""
        vault = self.gate.vault
        if vault.sweep_temporary():
            log.info("removed temporary files left by an interrupted write")
        for account in self.settings.accounts:
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

    def _factory(self, proto: str, session: Session, tls: ClientTls) -> Callable[[], Conn]:
        def make() -> Conn:
            conn = Conn(tls_first=tls.implicit)
            task = asyncio.get_running_loop().create_task(
                self._guard(proto, session, conn, tls))
            self._sessions.add(task)
            task.add_done_callback(self._session_done)
            return conn

        return make

    def _session_done(self, task: asyncio.Task[None]) -> None:
        self._sessions.discard(task)
        self._ended += 1

    async def _release_memory(self) -> None:
        """Hand memory freed by ended sessions back to the system now and then, so RSS goes
        back down after a crowd of clients leaves."""
        while True:
            await asyncio.sleep(MEMORY_RELEASE_INTERVAL)
            if self._ended:
                self._ended = 0
                await asyncio.to_thread(release_free_memory)

    async def _guard(self, proto: str, session: Session, conn: Conn, tls: ClientTls) -> None:
        # The protocol factory runs before the transport is attached.
        await conn.connected
        try:
            await session(self.gate, self.settings, conn, tls)
        except asyncio.CancelledError:
            conn.abort()
            raise
        except Exception:
            log.exception("%s session failed", proto)
            conn.abort()
        finally:
            conn.close()

    async def _drain(self) -> None:
        """Give open sessions a moment to finish, then cut them off."""
        if not self._sessions:
            return
        _, pending = await asyncio.wait(set(self._sessions), timeout=SHUTDOWN_GRACE)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def make_gate(settings: Settings) -> Gate:
    """The vault and the token manager for ``settings``; raises ``MasterKeyError``."""
    master = load_master_key(settings.vault.master_key) if settings.vault.master_key else None
    vault = Vault(settings.state_dir, master_key=master)
    tokens = TokenManager(settings.accounts, vault, settings.tokens,
                          failure_threshold=settings.notify.failure_threshold,
                          deadline_lead=settings.notify.before_deadline * 3600.0)
    return Gate(settings, vault, tokens)


async def serve(settings: Settings) -> None:
    daemon = Daemon(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    await daemon.run()
