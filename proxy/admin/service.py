"""The admin page's place in the daemon: its listener on the daemon's loop (over TLS when
configured), the tasks it owns (device-code sign-ins), the sign-in links it hands to the control
socket, and the sign-ins under way, each holding its account's sign-in lock."""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from . import hosts
from .auth import Gatekeeper, Session
from .model import CODE_SIGNIN_LIFETIME, AdminError, Backend, DeviceCodeView, Held, SignedIn

log = logging.getLogger("mailproxy.admin")

MAX_PENDING = 16
# How often sign-ins nobody came back to are dropped (and their locks released).
SWEEP_INTERVAL = 15.0
SHUTDOWN_TIMEOUT = 2.0
GENERATED_PASSWORD_BYTES = 18  # as `mailproxy authorize --generate-password`


def generate_password() -> str:
    return secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)


@dataclass
class CodeSignIn:
    key: str
    verifier: str = field(repr=False)
    redirect_uri: str
    password: str | None = field(repr=False)
    generated: bool
    session: Session = field(repr=False)
    expires_at: float
    lock: Held = field(repr=False)

    @property
    def started(self) -> float:
        return self.expires_at - CODE_SIGNIN_LIFETIME


@dataclass
class DeviceSignIn:
    key: str
    session: Session = field(repr=False)
    state: Literal["starting", "waiting", "approved", "failed"] = "starting"
    code: DeviceCodeView | None = None
    message: str = ""
    task: asyncio.Task[None] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Outcome:
    """The last sign-in result of an account, shown on its page (no secret in it)."""

    ok: bool
    message: str
    at: float


class AdminService:
    """``app_factory`` makes the aiohttp application for this service (``web.make_app``)."""

    def __init__(self, backend: Backend, host: str, port: int, *,
                 app_factory: Callable[[AdminService], web.Application],
                 clock: Callable[[], float] = time.time,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.backend = backend
        self._app_factory = app_factory
        self.host = host
        self.port = port
        self.clock = clock
        self.gate = Gatekeeper(clock)
        self._ssl = ssl_context
        self.secure = ssl_context is not None  # the cookie gets Secure, the links https://
        self.link_host = host  # the host in links: the listen address, or a name for a wildcard
        self.names: frozenset[str] = frozenset()  # the served certificate's names (TLS)
        self.error: str | None = None  # why the page is not served
        self.code_signins: dict[str, CodeSignIn] = {}  # by OAuth state
        self.device_signins: dict[str, DeviceSignIn] = {}  # by account key
        self.outcomes: dict[str, Outcome] = {}
        self._runner: web.AppRunner | None = None
        self._tasks: asyncio.TaskGroup | None = None

    @property
    def origin(self) -> str:
        host = f"[{self.link_host}]" if ":" in self.link_host else self.link_host
        return f"{'https' if self.secure else 'http'}://{host}:{self.port}"

    def host_allowed(self, value: str) -> bool:
        """Whether a Host header (or an Origin's host:port) names this page."""
        return hosts.host_allowed(value, listen_host=self.host, port=self.port,
                                  secure=self.secure, names=self.names)

    def callback_uri(self, request_host: str) -> str:
        """The redirect URI a sign-in from a page reached under ``request_host`` (already
        checked by ``host_allowed``) gives the provider. Over TLS the browser comes back to
        the name it used (its session cookie is for that name); on loopback http always to
        the listen address, the one registered with the provider."""
        if self.secure:
            return f"https://{request_host}/oauth/callback"
        return f"{self.origin}/oauth/callback"

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen. A port in use must not stop the mail listeners: the error is logged and
        given to whoever asks for a sign-in link."""
        if self.secure:
            await self._learn_names()
        runner = web.AppRunner(self._app_factory(self), access_log=None, handle_signals=False,
                               shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True,
                               ssl_context=self._ssl)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            self.error = (f"the admin page cannot listen on {self.host}:{self.port} "
                          f"({exc.strerror or exc}); change [admin] listen")
            log.error("%s", self.error)
            return
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple):
                self.port = int(address[1])
                break
        log.info("admin page listening on %s", self.origin)

    async def _learn_names(self) -> None:
        """The names the served certificate covers: the Host headers accepted, and the link's
        host when listening on every address."""
        view = await self.backend.tls()
        names = [n for c in view.served for n in c.names]
        self.names = frozenset(n.lower() for n in names)
        self.link_host = hosts.link_host(self.host, names)
        if view.error:
            log.warning("admin page: %s", view.error)
        elif self.host not in hosts.WILDCARDS and not any(
                hosts.name_matches(self.host.lower(), n) for n in names):
            log.warning("admin page: the TLS certificate does not name %s, so browsers will "
                        "warn; add it to [tls] names (or to the configured certificate)",
                        self.host)

    async def serve(self) -> None:
        """Own the page's tasks until cancelled, then close the listener and let go of the
        sign-in locks."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                while True:  # until cancelled
                    await asyncio.sleep(SWEEP_INTERVAL)
                    self.sweep()
        finally:
            self._tasks = None
            for state in list(self.code_signins):
                self._forget(state)
            if self._runner is not None:
                await self._runner.cleanup()
                self._runner = None

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        if self._tasks is None:
            coro.close()
            raise AdminError("the admin page is shutting down")
        return self._tasks.create_task(coro, name=name)

    # -- the control socket's command ----------------------------------------------------------

    async def link(self) -> dict[str, Any]:
        if self._runner is None:
            return {"error": self.error or "the admin page is not running yet; try again"}
        answer: dict[str, Any] = {}
        if self.secure:  # what the browser will be shown, to compare when it warns
            view = await self.backend.tls()
            answer["certificates"] = [f"{c.key} SHA-256 {c.sha256}" for c in view.served
                                      if c.role == "served"]
            answer["local_ca"] = view.generated
        token = self.gate.issue_link()
        answer.update(url=f"{self.origin}/signin?token={token}",
                      expires_in=int(self.gate.link_lifetime))
        return answer

    # -- authorization code -------------------------------------------------------------------

    async def begin_code(self, key: str, session: Session, password: str | None,
                         generated: bool, redirect_uri: str) -> str:
        """Remember a sign-in for the callback, holding the account's sign-in lock until it
        ends; the provider's address to send the browser to."""
        for state in [s for s, p in self.code_signins.items() if p.key == key]:
            self._forget(state)  # one per account: a new button press wins
        self.sweep()
        while len(self.code_signins) >= MAX_PENDING:
            self._forget(next(iter(self.code_signins)))
        lock = await self.backend.hold_sign_in(key)
        state = secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(64)
        try:
            url = self.backend.authorization_url(key, redirect_uri, state, verifier)
        except BaseException:
            lock.release()
            raise
        self.code_signins[state] = CodeSignIn(key, verifier, redirect_uri, password, generated,
                                              session, self.clock() + CODE_SIGNIN_LIFETIME, lock)
        return url

    def pending_code(self, key: str) -> CodeSignIn | None:
        """The browser sign-in of this account waiting for the provider's redirect."""
        now = self.clock()
        return next((p for p in self.code_signins.values()
                     if p.key == key and p.expires_at > now), None)

    def take_code(self, state: str | None) -> CodeSignIn | None:
        """The sign-in this redirect belongs to (spent now; ``finish_code`` or ``abandon_code``
        ends it), or None."""
        pending = self.code_signins.pop(state or "", None)
        if pending is not None and pending.expires_at <= self.clock():
            pending.lock.release()
            return None
        return pending

    async def finish_code(self, pending: CodeSignIn, code: str) -> Outcome:
        try:
            done = await self.backend.sign_in_with_code(
                pending.key, code, pending.redirect_uri, pending.verifier, pending.password)
        except AdminError as exc:
            return self.note(pending.key, False, str(exc))
        finally:
            pending.lock.release()
        self._remember(pending.session, pending.key, done, pending.password, pending.generated)
        return self.note(pending.key, True, done.message)

    def abandon_code(self, pending: CodeSignIn, message: str) -> Outcome:
        """The provider answered with an error: nothing to exchange."""
        pending.lock.release()
        return self.note(pending.key, False, message)

    def sweep(self) -> None:
        """Drop browser sign-ins nobody came back to, releasing their locks."""
        now = self.clock()
        for state in [s for s, p in self.code_signins.items() if p.expires_at <= now]:
            self._forget(state)

    def _forget(self, state: str) -> None:
        pending = self.code_signins.pop(state, None)
        if pending is not None:
            pending.lock.release()

    async def cancel(self, key: str) -> bool:
        """End the account's sign-in under way on the page (either kind); True if there was
        one."""
        states = [s for s, p in self.code_signins.items() if p.key == key]
        for state in states:
            self._forget(state)
        job = self.device_signins.get(key)
        running = job is not None and job.task is not None and not job.task.done()
        if running:
            await self._stop_device(key)
        return bool(states) or running

    # -- device code --------------------------------------------------------------------------

    async def begin_device(self, key: str, session: Session, password: str | None,
                           generated: bool) -> DeviceSignIn:
        """Start a device-code sign-in in the page's task group; it holds the account's
        sign-in lock until it ends."""
        await self._stop_device(key)
        lock = await self.backend.hold_sign_in(key)
        job = DeviceSignIn(key, session)

        def show(code: DeviceCodeView) -> None:
            job.code = code
            job.state = "waiting"

        async def run() -> None:
            try:
                done = await self.backend.sign_in_with_device(key, show, password)
            except AdminError as exc:
                job.state, job.message = "failed", str(exc)
                self.note(key, False, str(exc))
            except asyncio.CancelledError:
                job.state, job.message = "failed", "cancelled"
                raise
            except Exception:  # a bug must not take the page's task group down
                log.exception("admin page: device sign-in of %s crashed", key)
                job.state, job.message = "failed", "internal error; see the daemon's log"
            else:
                job.state, job.message = "approved", done.message
                self._remember(session, key, done, password, generated)
                self.note(key, True, done.message)
            finally:
                lock.release()

        self.device_signins[key] = job
        try:
            job.task = self.spawn(run(), f"admin device sign-in {key}")
        except BaseException:
            lock.release()
            raise
        return job

    async def _stop_device(self, key: str) -> None:
        """Cancel the account's device sign-in and wait until it has let go of the lock."""
        old = self.device_signins.pop(key, None)
        if old is not None and old.task is not None and not old.task.done():
            old.task.cancel()
            await asyncio.wait({old.task})

    # -- client credentials / service account -------------------------------------------------

    async def test_app(self, key: str, session: Session, password: str | None,
                       generated: bool) -> Outcome:
        try:
            lock = await self.backend.hold_sign_in(key)
            try:
                done = await self.backend.sign_in_app(key, password)
            finally:
                lock.release()
        except AdminError as exc:
            return self.note(key, False, str(exc))
        self._remember(session, key, done, password, generated)
        return self.note(key, True, done.message)

    # -- results ------------------------------------------------------------------------------

    def note(self, key: str, ok: bool, message: str) -> Outcome:
        outcome = Outcome(ok, message, self.clock())
        self.outcomes[key] = outcome
        return outcome

    @staticmethod
    def _remember(session: Session, key: str, done: SignedIn, password: str | None,
                  generated: bool) -> None:
        lines = session.once.setdefault(key, [])
        if generated and password is not None:
            lines.append(("password", password))
        if done.replaced_passwords:
            lines.append(("note", f"The vault was made anew: the {done.replaced_passwords} "
                                  "earlier local password(s) of this account no longer work."))
