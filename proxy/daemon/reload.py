"""Reload (SIGHUP, ``mailproxy reload``): read the configuration again, diff it against the
running one and hand each part its change. A configuration that does not load, or cannot be
applied (a port taken), is refused with the reason and the old one keeps serving.

Sessions in flight keep the settings they started with; new sessions get the new ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import Account, ConfigError, Settings, TlsVersion
from ..login import Gate
from ..tls.contexts import ServerTls, TlsSetupError
from .startup import StartupError
from .systemd import SystemdNotifier

log = logging.getLogger("mailproxy.reload")

PROTOCOLS = ("imap", "pop3", "smtp")
# What a running daemon cannot take over: these keys need a restart.
RESTART_KEYS = ("state_dir", "control_socket", "vault", "admin")

Loader = Callable[[], Settings]


class Daemon(Protocol):
    """What a reload needs of the daemon (``server.Daemon``)."""

    settings: Settings
    gate: Gate
    systemd: SystemdNotifier

    def status_line(self) -> str: ...

    async def bind_listeners(self, listen: Mapping[str, str],
                             settings: Settings) -> dict[str, asyncio.Server]: ...

    async def restart_metrics(self, listen: str) -> None: ...

    async def prepare_tls(self, settings: Settings) -> ServerTls: ...

    def apply_settings(self, settings: Settings, opened: Mapping[str, asyncio.Server],
                       tls: ServerTls | None = None) -> None: ...

    def open_vaults(self, accounts: Sequence[Account]) -> None: ...

    async def replace_notifier(self, settings: Settings) -> None: ...


def listeners(settings: Settings) -> dict[str, str]:
    """Every listener to bind: ``{"imap": "host:port", "imaps": ..., ...}`` ("imaps", "pop3s",
    "smtps": a protocol's implicit-TLS listener, when its ``tls_listen`` is set)."""
    out = {}
    for proto in PROTOCOLS:
        listener = getattr(settings, proto)
        out[proto] = listener.listen
        if listener.tls_listen:
            out[proto + "s"] = listener.tls_listen
    return out


def tls_versions(settings: Settings) -> set[TlsVersion]:
    return {getattr(settings, proto).tls_min_version for proto in PROTOCOLS}


class ReloadRefused(Exception):
    """The new configuration is not applied; the message says why."""


@dataclass
class Changes:
    """What differs between the running settings and the new ones."""

    # Listener ("imap", "imaps", ...): (old address, new address), "" for none.
    listeners: dict[str, tuple[str, str]] = field(default_factory=dict)
    added: list[Account] = field(default_factory=list)
    removed: list[Account] = field(default_factory=list)
    changed: list[Account] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)  # other sections that changed
    # New server TLS contexts needed: [tls] changed, or a tls_min_version not served yet.
    new_tls: bool = False

    def describe(self) -> list[str]:
        out = [f"{name} listener moved from {old} to {new}" if old and new
               else f"{name} listener opened on {new}" if new
               else f"{name} listener on {old} closed"
               for name, (old, new) in self.listeners.items()]
        out += [f"account {a.address} added" for a in self.added]
        out += [f"account {a.address} removed" for a in self.removed]
        out += [f"account {a.address} changed" for a in self.changed]
        out += [f"[{name}] changed" if name != "shutdown_grace" and name != "log_level"
                else f"{name} changed" for name in self.sections]
        return out or ["no changes"]


def diff(old: Settings, new: Settings) -> Changes:
    changes = Changes()
    for key in RESTART_KEYS:
        if getattr(old, key) != getattr(new, key):
            changes.restart.append(key)
    bound, wanted_bound = listeners(old), listeners(new)
    for name in dict.fromkeys([*bound, *wanted_bound]):
        if bound.get(name, "") != wanted_bound.get(name, ""):
            changes.listeners[name] = (bound.get(name, ""), wanted_bound.get(name, ""))
    addresses = {"listen": "", "tls_listen": ""}
    for proto in PROTOCOLS:
        # require_tls and tls_min_version apply to the next connection, like the limits.
        before, after = getattr(old, proto), getattr(new, proto)
        if before.model_copy(update=addresses) != after.model_copy(update=addresses):
            changes.sections.append(proto)
    # The running contexts serve the versions of the running settings (or more).
    changes.new_tls = old.tls != new.tls or not tls_versions(new) <= tls_versions(old)
    for name in ("tls", "tokens", "notify", "metrics", "shutdown_grace", "log_level"):
        if getattr(old, name) != getattr(new, name):
            changes.sections.append(name)
    running = {a.key: a for a in old.accounts}
    wanted = {a.key: a for a in new.accounts}
    changes.added = [a for k, a in wanted.items() if k not in running]
    changes.removed = [a for k, a in running.items() if k not in wanted]
    changes.changed = [a for k, a in wanted.items() if k in running and running[k] != a]
    return changes


class Reloader:
    """Runs reloads one at a time in the daemon's task group (``run``); SIGHUP (``request``) and
    the control socket (``ask``) queue them."""

    def __init__(self, daemon: Daemon, load: Loader) -> None:
        self._daemon = daemon
        self._load = load
        self._queue: asyncio.Queue[asyncio.Future[dict[str, Any]] | None] = asyncio.Queue()

    def request(self) -> None:
        """From the SIGHUP handler: reload soon, the result goes to the log."""
        self._queue.put_nowait(None)

    async def ask(self) -> dict[str, Any]:
        """Reload and say how it went (``{"ok": bool, "changes"|"error": ...}``)."""
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(done)
        # shield: a caller that gives up must not cancel a reload half applied.
        return await asyncio.shield(done)

    async def run(self) -> None:
        while True:
            waiter = await self._queue.get()
            result = await self.reload()
            if waiter is not None and not waiter.done():
                waiter.set_result(result)

    async def reload(self) -> dict[str, Any]:
        daemon = self._daemon
        daemon.systemd.reloading()
        log.info("reloading the configuration")
        try:
            changes = await self._apply()
        except ReloadRefused as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            result: dict[str, Any] = {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must not end the daemon: the old settings stay
            log.exception("reload failed, the running configuration stays")
            result = {"ok": False, "error": f"internal error: {exc!r}"}
        else:
            for line in changes:
                log.info("reload: %s", line)
            result = {"ok": True, "changes": changes}
        daemon.systemd.ready(daemon.status_line())
        return result

    async def _apply(self) -> list[str]:
        daemon = self._daemon
        old = daemon.settings
        try:
            new = await asyncio.to_thread(self._load)
        except ConfigError as exc:
            raise ReloadRefused(str(exc)) from None
        changes = diff(old, new)
        if changes.restart:
            raise ReloadRefused("changing " + ", ".join(changes.restart) + " needs a restart "
                                "(systemctl restart mailproxy)")
        # Everything that can fail comes first; the rest cannot.
        tls = None
        if changes.new_tls:
            try:
                tls = await daemon.prepare_tls(new)
            except TlsSetupError as exc:
                raise ReloadRefused(str(exc)) from None
        try:
            opened = await daemon.bind_listeners(
                {name: where for name, (_, where) in changes.listeners.items() if where}, new)
        except StartupError as exc:
            raise ReloadRefused(str(exc)) from None
        try:
            if "metrics" in changes.sections:
                await daemon.restart_metrics(new.metrics.listen)
        except OSError as exc:
            for server in opened.values():
                server.close()
            raise ReloadRefused(f"cannot listen on {new.metrics.listen} for metrics: "
                                f"{exc.strerror or exc}") from None
        daemon.apply_settings(new, opened, tls)
        tokens = daemon.gate.tokens
        await tokens.reconfigure(new.accounts, new.tokens,
                                 failure_threshold=new.notify.failure_threshold,
                                 deadline_lead=new.notify.before_deadline * 3600.0)
        if changes.added or changes.changed:
            await asyncio.to_thread(daemon.open_vaults, changes.added + changes.changed)
        if "notify" in changes.sections:
            await daemon.replace_notifier(new)
        return changes.describe()
