"""The admin page's place in the daemon: its listener on the daemon's loop, the tasks it owns
(device-code sign-ins), the sign-in links it hands to the control socket, and the sign-ins
waiting for a provider's redirect."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from .auth import Gatekeeper, Session
from .model import AdminError, Backend, DeviceCodeView, SignedIn

log = logging.getLogger("mailproxy.admin")

# A sign-in started on the page waits this long for the provider's redirect.
CODE_SIGNIN_LIFETIME = 15 * 60.0
MAX_PENDING = 16
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
                 clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self._app_factory = app_factory
        self.host = host
        self.port = port
        self.clock = clock
        self.gate = Gatekeeper(clock)
        self.secure = False  # TLS on the admin listener: not yet
        self.error: str | None = None  # why the page is not served
        self.code_signins: dict[str, CodeSignIn] = {}  # by OAuth state
        self.device_signins: dict[str, DeviceSignIn] = {}  # by account key
        self.outcomes: dict[str, Outcome] = {}
        self._runner: web.AppRunner | None = None
        self._tasks: asyncio.TaskGroup | None = None

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.secure else 'http'}://{host}:{self.port}"

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen. A port in use must not stop the mail listeners: the error is logged and
        given to whoever asks for a sign-in link."""
        runner = web.AppRunner(self._app_factory(self), access_log=None, handle_signals=False,
                               shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
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

    async def serve(self) -> None:
        """Own the page's tasks until cancelled, then close the listener."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self._tasks = None
            if self._runner is not None:
                await self._runner.cleanup()
                self._runner = None

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        if self._tasks is None:
            coro.close()
            raise AdminError("the admin page is shutting down")
        return self._tasks.create_task(coro, name=name)

    # -- the control socket's command ----------------------------------------------------------

    def link(self) -> dict[str, Any]:
        if self._runner is None:
            return {"error": self.error or "the admin page is not running yet; try again"}
        token = self.gate.issue_link()
        return {"url": f"{self.origin}/signin?token={token}",
                "expires_in": int(self.gate.link_lifetime)}

    # -- authorization code -------------------------------------------------------------------

    def begin_code(self, key: str, session: Session, password: str | None,
                   generated: bool) -> str:
        """Remember a sign-in for the callback; the provider's address to send the browser to."""
        now = self.clock()
        for state in [s for s, p in self.code_signins.items()
                      if p.expires_at <= now or p.key == key]:
            del self.code_signins[state]  # one per account: a new button press wins
        while len(self.code_signins) >= MAX_PENDING:
            del self.code_signins[next(iter(self.code_signins))]
        state = secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(64)
        redirect_uri = f"{self.origin}/oauth/callback"
        url = self.backend.authorization_url(key, redirect_uri, state, verifier)
        self.code_signins[state] = CodeSignIn(key, verifier, redirect_uri, password, generated,
                                              session, now + CODE_SIGNIN_LIFETIME)
        return url

    def take_code(self, state: str | None) -> CodeSignIn | None:
        """The sign-in this redirect belongs to (spent now), or None."""
        pending = self.code_signins.pop(state or "", None)
        if pending is None or pending.expires_at <= self.clock():
            return None
        return pending

    async def finish_code(self, pending: CodeSignIn, code: str) -> Outcome:
        try:
            done = await self.backend.sign_in_with_code(
                pending.key, code, pending.redirect_uri, pending.verifier, pending.password)
        except AdminError as exc:
            return self.note(pending.key, False, str(exc))
        self._remember(pending.session, pending.key, done, pending.password, pending.generated)
        return self.note(pending.key, True, done.message)

    # -- device code --------------------------------------------------------------------------

    def begin_device(self, key: str, session: Session, password: str | None,
                     generated: bool) -> DeviceSignIn:
        old = self.device_signins.pop(key, None)
        if old is not None and old.task is not None:
            old.task.cancel()
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
            except Exception:  # a bug must not take the page's task group down
                log.exception("admin page: device sign-in of %s crashed", key)
                job.state, job.message = "failed", "internal error; see the daemon's log"
            else:
                job.state, job.message = "approved", done.message
                self._remember(session, key, done, password, generated)
                self.note(key, True, done.message)

        self.device_signins[key] = job
        job.task = self.spawn(run(), f"admin device sign-in {key}")
        return job

    # -- client credentials / service account -------------------------------------------------

    async def test_app(self, key: str, session: Session, password: str | None,
                       generated: bool) -> Outcome:
        try:
            done = await self.backend.sign_in_app(key, password)
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
