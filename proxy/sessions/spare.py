"""Logged-in upstream IMAP sessions made ahead of an account's next client login (``[imap]
spare_sessions``, ``spare_idle``), so that login skips the upstream TLS handshake and SASL.

Only an account whose client just logged in gets one (made in the background after that
login), and only a client whose local password was checked takes it. A spare is handed out
only while its connection is open with nothing received (a server's BYE or autologout makes
it useless), it is younger than ``spare_idle``, the account is configured as it was when the
spare was made, and its grant is not known to be revoked; anything else is a miss and the
client logs in the normal way. Never for POP3: a logged-in POP3 session locks the maildrop.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import logs
from ..config import Account, Settings
from ..login import Gate, Refusal
from ..smtp.pool import SessionPool
from .imap import ImapUpstreamSession

log = logging.getLogger("mailproxy.spare")

# How often spares are looked at for expiry (and for a server that closed them).
EXPIRE_INTERVAL = 10.0
# How long a client login waits for a spare being made before it logs in on its own: longer
# than an upstream login takes, far shorter than a client's patience.
SPARE_WAIT = 5.0


def boot_clock() -> float:
    """Seconds that go on while the machine sleeps (``CLOCK_BOOTTIME``; ``monotonic`` does
    not count a suspend): a spare made before a laptop's night is too old the next morning."""
    return time.clock_gettime(_BOOTTIME)


_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


@dataclass(eq=False)
class Spare:
    """A logged-in session and the account as it was configured when the session was made."""

    account: Account
    session: ImapUpstreamSession

    @property
    def connected(self) -> bool:
        conn = self.session.conn
        return conn is not None and conn.quiet and self.session.logged_in is not None

    def close(self) -> None:
        self.session.close()


class SpareSessions:
    """The daemon's spares (``login.Spares``). ``run`` (in the daemon's task group) owns the
    tasks that make them, expires them, and closes them all when it ends."""

    def __init__(self, gate: Gate, settings: Settings, *,
                 make: Callable[[Account], ImapUpstreamSession] = ImapUpstreamSession,
                 clock: Callable[[], float] = boot_clock) -> None:
        self.gate = gate
        self.settings = settings
        self._make = make
        self.pool: SessionPool[Spare] = SessionPool(
            idle_timeout=settings.imap.spare_idle, per_account=settings.imap.spare_sessions,
            clock=clock)
        self._making: dict[str, asyncio.Task[None]] = {}  # per account key, one at a time
        self._awaited: set[str] = set()  # account keys whose refill a login is waiting for
        # Per account key, bumped by ``drop``: a spare made across a drop is not kept.
        self._generation: dict[str, int] = {}
        self._tasks: asyncio.TaskGroup | None = None  # while ``run`` runs

    @property
    def enabled(self) -> bool:
        return self.settings.imap.spare_sessions > 0 and self._tasks is not None

    # -- login.Spares --------------------------------------------------------------------

    async def take(self, account: Account, deadline: float | None = None
                   ) -> ImapUpstreamSession | None:
        if not self.enabled:
            return None
        key = account.key
        making = self._making.get(key)
        if not self.pool.idle(key) and making is not None and key not in self._awaited:
            # Started earlier than a login of our own would be; if it fails, we log in. (wait:
            # neither its failure nor its cancellation at shutdown is raised here.) One login
            # waits for it: the others of a client opening several connections at once would
            # only wait to find it taken, and log in the normal way at once instead.
            timeout = SPARE_WAIT if deadline is None \
                else min(SPARE_WAIT, max(0.0, deadline - asyncio.get_running_loop().time()))
            self._awaited.add(key)
            try:
                await asyncio.wait({making}, timeout=timeout)
            finally:
                self._awaited.discard(key)
        spare = self.next_usable(account)
        return spare.session if spare is not None else None

    def next_usable(self, account: Account) -> Spare | None:
        """A usable spare of ``account`` out of the pool (the rest closed), counted as a hit,
        miss or stale."""
        key = account.key
        had = self.pool.idle(key)
        spare = self.pool.take(key)  # too old or closed: dropped by the pool
        if spare is not None and not self._current(spare):
            spare.close()
            self.pool.drop(key)  # made for the same configuration: none is current
            spare = None
        result = "hit" if spare is not None else "stale" if had else "miss"
        self.gate.observer.spare("imap", result)
        return spare

    def used(self, account: Account) -> None:
        key = account.key
        tasks = self._tasks
        if tasks is None or key in self._making \
                or self.pool.idle(key) >= self.settings.imap.spare_sessions:
            return
        # A context of its own: its log lines are not the client session's.
        context = contextvars.Context()
        context.run(_log_context, account)
        refill = self._refill(account)
        try:
            self._making[key] = tasks.create_task(refill, context=context,
                                                  name=f"imap spare {key}")
        except RuntimeError:  # the task group is shutting down: the daemon is stopping
            refill.close()

    # -- keeping them current ------------------------------------------------------------

    def drop(self, account_key: str) -> None:
        """Close the account's spares, and keep none being made now (grant revoked)."""
        self._generation[account_key] = self._generation.get(account_key, 0) + 1
        self.pool.drop(account_key)

    def reconfigure(self, settings: Settings) -> None:
        """A reload: new limits, and the spares of removed or changed accounts closed (those
        kept were made for the running configuration: ``_current`` refuses the others)."""
        old, self.settings = self.settings, settings
        self.pool.idle_timeout = settings.imap.spare_idle
        self.pool.per_account = settings.imap.spare_sessions
        for key in [*self.pool.accounts(), *self._making]:
            account = settings.account(key)
            if account is None or account != old.account(key) \
                    or settings.imap.spare_sessions == 0:
                self.drop(key)
        self.pool.expire()

    def _current(self, spare: Spare) -> bool:
        account = spare.account
        if self.settings.account(account.key) != account:
            return False  # removed or changed by a reload
        try:
            state = self.gate.tokens.source.last_state(account.key)
        except KeyError:
            return False
        return state.needs_authorization is None

    async def _refill(self, account: Account) -> None:
        key = account.key
        generation = self._generation.get(key, 0)
        started = time.monotonic()
        session: ImapUpstreamSession | None = None
        try:
            session = self._make(account)
            await self.gate.relogin(account, session, spare=True)
        except Refusal as refusal:  # tried again after the account's next client login
            log.info("no spare imap session for %s: %s", account.address, refusal.text)
            return
        except Exception:  # a bug must not end the daemon's task group
            log.exception("no spare imap session for %s", account.address)
            if session is not None:
                session.close()
            return
        finally:
            self._making.pop(key, None)
        spare = Spare(account, session)
        if self._generation.get(key, 0) != generation or not self._current(spare) \
                or not self.enabled:
            spare.close()
            return
        self.pool.give(key, spare)
        log.debug("spare imap session for %s ready in %.1f ms", account.address,
                  (time.monotonic() - started) * 1000)
        self.used(account)  # the next one, while fewer than spare_sessions are ready

    async def run(self) -> None:
        """Own the tasks making spares and expire spares, until cancelled; then close all."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                await self.pool.run(EXPIRE_INTERVAL)
        finally:
            self._tasks = None
            self.pool.close()


def _log_context(account: Account) -> None:
    logs.protocol.set("imap")
    logs.account.set(account.address)
