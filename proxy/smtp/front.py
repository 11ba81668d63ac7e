"""The local SMTP side: aiosmtpd on the daemon's own event loop, and all client I/O.

``SmtpFront`` (an aiosmtpd ``SMTP`` per connection) does AUTH PLAIN/LOGIN itself so the login
can await the gate, answers MAIL, RCPT, RSET and QUIT with what the session's
``transaction.Transaction`` replies, and replaces aiosmtpd's DATA with a streamed one: it
reads the message (``data.pump``) into the transaction's sink and writes every reply itself.
A ``[[devices]]`` network may send without AUTH (sessions.py); ``Sessions`` picks the transaction.

long: one aiosmtpd subclass whose parts share its state (admission, the login deadline, AUTH,
streamed DATA, the idle timer); its hooks live in hooks.py, the hardened base in guard.py.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import logging
import re
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, AnyStr

from aiosmtpd.smtp import MISSING, AuthResult, Session, TLSSetupException, syntax

from .. import __version__, logs
from ..config import Account, Device, Settings
from ..daemon.limits import ConnectionLimits, refuse
from ..login import Refusal
from ..net import describe_error, peer_host
from ..observe import Observer
from .data import Outcome, pump
from .guard import GuardedSMTP
from .hooks import Hooks
from .replies import Reply, add_enhanced_codes, format_reply, refusal_reply
from .sessions import Opened, Sessions, device_refusal
from .transaction import Transaction
from .upstream import DATA_END_TIMEOUT

log = logging.getLogger("mailproxy.smtp")
session_log = logging.getLogger("mailproxy.session")
tls_log = logging.getLogger("mailproxy.tls")

# Failed AUTH commands on one connection before it is closed (as IMAP and POP3 do).
MAX_AUTH_FAILURES = 5
# Without a configured limit, and before login (the account, so its server, is not known yet).
DEFAULT_SIZE = 35 * 1024 * 1024
# aiosmtpd's own per-command logging would show addresses at INFO; we log our own summary.
logging.getLogger("mail.log").setLevel(logging.WARNING)
# aiosmtpd's go-ahead to STARTTLS, and ours: with ENHANCEDSTATUSCODES announced it has its
# code too (RFC 2034 spares only the greeting and the answers to HELO and EHLO), as Postfix's.
_STARTTLS_GO_AHEAD = ("220 Ready to start TLS", "220 2.0.0 Ready to start TLS")
# "<dot-atom@domain> params": the everyday MAIL/RCPT argument, for which aiosmtpd's parser
# (the email package's header parser, ~45 us an address) gives exactly the text between <>.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# RFC 3461 parameters, passed through to an upstream that offers DSN.
_DSN_PARAMS = ("RET", "ENVID", "NOTIFY", "ORCPT")
_SIMPLE_PATH = re.compile(
    rf"<(?P<local>{_ATEXT}(?:\.{_ATEXT})*)@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*>\s*(?P<rest>.*)",
    re.DOTALL)


class _Session(Session):
    """aiosmtpd's Session without its legacy ``login_data``: aiosmtpd itself sets it after
    every successful AUTH, and the property logs a deprecation WARNING each time."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class SmtpFront(GuardedSMTP):
    """aiosmtpd's SMTP with our AUTH (awaiting the gate), streamed DATA and RFC 2034 codes.

    aiosmtpd leaves no public way for some of this, so this module (and, for pushing bytes
    back into the client stream, ``data.unread``) alone uses its internals: ``_reader`` (the
    client stream, read by DATA), the idle timer (``_reset_timeout``, ``_timeout_cb``,
    ``_timeout_handle``, ``_timeout_duration``), ``_auth_required``, ``_auth_require_tls``,
    ``_tls_protocol`` (whether STARTTLS is done), ``_getaddr``,
    ``_create_session``, ``_handler_coroutine`` and ``Session._login_data``.
    """

    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, settings: Settings, hostname: str, sessions: Sessions,
                 on_lost: Callable[[SmtpFront], None],
                 limits: ConnectionLimits | None = None, *,
                 tls_context: ssl.SSLContext | None = None, tls_required: bool = False,
                 observer: Observer | None = None) -> None:
        """``tls_context``: offer STARTTLS with it; ``tls_required``: no AUTH before it;
        ``observer``: told the connection's byte counts when it ends (the metrics)."""
        super().__init__(
            Hooks(), hostname=hostname, ident=f"mailproxy {__version__} ESMTP",
            data_size_limit=None, enable_SMTPUTF8=True, decode_data=False,
            timeout=settings.smtp.idle_timeout, auth_require_tls=False,
            tls_context=tls_context, require_starttls=False,
            loop=asyncio.get_running_loop())
        # Set after __init__: passing auth_required with auth_require_tls=False makes
        # aiosmtpd warn on every connection. With TLS required, EHLO lists AUTH only after
        # STARTTLS (aiosmtpd's own rule, by _auth_require_tls); smtp_AUTH answers before that.
        self._auth_required = True
        self._auth_require_tls = self._tls_required = tls_required
        self.settings = settings
        self.sessions = sessions
        self.on_lost = on_lost
        self.account: Account | None = None
        # Where this session's mail goes, once logged in (a device's: at its first MAIL).
        self.transaction: Transaction | None = None
        self.device: Device | None = None  # its network's device rule, until an AUTH
        # What the upstream announced in its EHLO (lower-case names), once logged in.
        self.upstream_extensions: frozenset[str] | None = None
        self._verbatim = False
        self._deadline = 0.0  # of the idle timer, see _reset_timeout
        self._log_context: contextvars.Context | None = None
        self._started = 0.0
        self.limits = limits
        self.observer = observer or Observer()
        self.peer = "unknown"
        self._admitted = False  # counted in `limits`: released when the connection ends
        self._login_timer: asyncio.TimerHandle | None = None
        self._auth_failures = 0
        self._refused = False

    def _login_expired(self) -> None:
        self._login_timer = None
        transport = self._real
        if (self.account is None and transport is not None and not transport.is_closing()
                and not self.lingering):
            if self.tls_pending:  # nothing in the clear in the middle of a TLS handshake
                transport.close()
                return
            transport.write(b"421 4.4.2 Too long without logging in, closing connection\r\n")
            self.linger()

    @property
    def session_task(self) -> asyncio.Task[None] | None:
        """The task that runs this connection's dialogue (aiosmtpd's)."""
        return self._handler_coroutine

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def _open(self, opened: Opened) -> None:
        if self.transaction is not None:
            self.transaction.close()
        self.account = opened.account
        self.transaction = opened.transaction
        self.upstream_extensions = opened.extensions
        self.data_size_limit = (self.settings.smtp.max_message_size or opened.size_limit
                                or DEFAULT_SIZE)

    async def device_mail(self, device: Device, sender: str) -> Reply | None:
        """MAIL in a device's session: a refusal, or None (go on with the transaction)."""
        if not device.allows_sender(sender):
            return device_refusal(device, sender, self.session.peer if self.session else None)
        try:
            if self.transaction is None:
                self._open(await self.sessions.open_device(device))
        except Refusal as refusal:
            return refusal_reply(refusal)
        return None

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        match = _SIMPLE_PATH.fullmatch(arg.lstrip())
        if match is None or (self.local_part_limit
                             and len(match["local"]) > self.local_part_limit):
            return super()._getaddr(arg)  # the null path, quoting, UTF-8, literals, ...
        path = match.group(0)
        return path[1:path.index(">")], match["rest"]

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        # aiosmtpd refuses MAIL and RCPT parameters it does not know with 555: the DSN ones
        # go to the upstream (with the options the hooks get) when it offers DSN.
        result = super()._getparams(params)
        if result is not None and "dsn" in (self.upstream_extensions or ()):
            for name in _DSN_PARAMS:
                result.pop(name, None)
        return result

    def size_to_advertise(self) -> int:
        if self.data_size_limit:
            return self.data_size_limit
        # Not what another account's server said: this client's may differ.
        return self.settings.smtp.max_message_size or DEFAULT_SIZE

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels and re-creates a timer for every command (and we did per chunk):
        # only the deadline moves here, and the timer is re-armed when it fires too early.
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)
            return
        # aiosmtpd just closes; say why first (RFC 5321 4.5.3.2: the server may time out).
        if self._real is not None and not self._real.is_closing() and not self.lingering:
            if self.tls_pending:  # nothing in the clear in the middle of a TLS handshake
                self._real.close()
                return
            self._real.write(b"421 4.4.2 Idle for too long, closing connection\r\n")
            self.linger()  # connection_lost() cleans up, as in aiosmtpd's own callback

    def end_transaction(self) -> None:
        self.envelope = self._create_envelope()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # Replaces aiosmtpd's, which reads the message line by line, un-stuffs it and hands
        # it over only when complete; its checks and replies are kept.
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        self.in_data = True
        try:
            reply = await self._data()
        finally:
            self.in_data = False
        if reply is None:
            if self.transport is not None:
                self.transport.close()
            return
        await self.push(reply)

    async def _data(self) -> Reply | None:
        """DATA: the message read and streamed into the transaction; the reply for the
        client, or None when it went away in the middle of the message (nobody to answer)."""
        transaction = self.transaction
        assert transaction is not None and self.account is not None
        start = await transaction.data()
        if start.sink is None:
            if start.ended:
                self.end_transaction()
            return start.reply
        await self.push(start.reply)
        try:
            result = await pump(self._reader, start.sink, self.data_size_limit,
                                self._reset_timeout, start.ready)
            if result.outcome is Outcome.SENT:
                # The client is waiting for this reply, not idle (RFC 5321 4.5.3.2.6).
                self._reset_timeout(DATA_END_TIMEOUT + 60)
                reply = await transaction.finish(result.size)
        except BaseException:
            # Cancelled because the client went away, or a bug. Unless the end marker was
            # sent already, the transaction drops the partial message; and a client stopped
            # in the middle of its message cannot be resynchronised (its next lines would be
            # read as commands).
            transaction.abort()
            if self.transport is not None:
                self.transport.close()
            raise
        finally:
            self.end_transaction()
        if self.transport is not None:
            self._reset_timeout()
        if result.outcome is Outcome.SENT:
            return reply
        if result.outcome is Outcome.UPSTREAM_LOST:
            return transaction.failed(result.error)
        if result.outcome is Outcome.REFUSED:
            return await transaction.refused()
        transaction.abort()
        if result.outcome is Outcome.CLIENT_GONE:
            log.info("smtp: the client of %s went away in the middle of a message",
                     self.account.address)
            return None
        log.info("smtp: message from %s refused: over the size limit of %s bytes",
                 self.account.address, self.data_size_limit)
        return format_reply(552, f"message exceeds the size limit of {self.data_size_limit} "
                            "bytes; nothing was sent", "5.3.4")

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # No TLS handshake after STARTTLS's go-ahead (garbage, or the client went away):
            # aiosmtpd closes the connection, and nothing can be said in the clear.
            tls_log.info("smtp: TLS handshake with %s failed: %s", self.peer,
                         describe_error(error.__cause__ or error))
            return ""
        log.error("smtp session error: %s", error, exc_info=error)
        # Never anything that could read as success: the client keeps the message and retries.
        return "451 4.3.0 Internal error in mailproxy; please try again"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._log_context is None  # aiosmtpd calls this again after STARTTLS
        if first:
            self.peer = peer_host(transport)
            if self.limits is not None:
                if not self.limits.admit(self.peer):
                    log.info("smtp: connection from %s refused: too many connections",
                             self.peer)
                    refuse(transport, "smtp")
                    self._refused = True
                    return
                self._admitted = True
            # Set before aiosmtpd creates the session's task, which copies this context.
            logs.begin_session("smtp", transport.get_extra_info("peername"))
            self._log_context = contextvars.copy_context()
            self._started = time.monotonic()
        super().connection_made(transport)
        if first:
            # The whole time allowed to log in: aiosmtpd's idle timer restarts per command.
            self._login_timer = self.loop.call_later(self.settings.smtp.login_timeout,
                                                     self._login_expired)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.device = self.sessions.device_for(str(peer[0]))
            if self.device is not None:
                self._auth_required = False  # MAIL without AUTH: the device rule decides

    def connection_lost(self, error: Exception | None) -> None:
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        if self._admitted and self.limits is not None:
            self._admitted = False
            self.limits.release(self.peer)
        elif self._refused:
            self.on_lost(self)  # refused at connection_made: aiosmtpd never started
            return
        if self._log_context is not None:
            # The kernel's counters, read once as the connection goes (as IMAP and POP3 do).
            counts = logs.tcp_counts(self.transport)
            self._log_context.run(logs.log_session_end, session_log, self._started, counts)
            if counts is not None:
                self.observer.session_ended("smtp", *counts)
        super().connection_lost(error)
        if self.transaction is not None:
            self.transaction.close()
        self.on_lost(self)

    async def push(self, status: AnyStr) -> None:
        text = status if isinstance(status, str) else status.decode("utf-8", "surrogateescape")
        if text == _STARTTLS_GO_AHEAD[0]:
            text = _STARTTLS_GO_AHEAD[1]
        # HELO and EHLO answer with their 250 as it is (RFC 2034), errors get their codes.
        if not (self._verbatim and text.startswith("250")):
            text = add_enhanced_codes(text)
        await super().push(text)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        # EHLO adds to aiosmtpd's per-command limits every time: start from RFC 5321's.
        self.command_size_limits.clear()
        self.command_size_limits["AUTH"] = self.line_length_limit
        self._verbatim = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._verbatim = False

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        self._verbatim = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._verbatim = False

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        assert self.session is not None
        if self._tls_required and self._tls_protocol is None:
            await self.push("530 5.7.0 Must issue a STARTTLS command first")
            return
        if self.session.host_name and not self.session.extended_smtp:
            await self.push("503 5.5.1 Error: send EHLO first (AUTH is an ESMTP extension)")
            return
        if self.envelope is not None and self.envelope.mail_from:
            await self.push("503 5.5.1 Error: AUTH not allowed during a mail transaction")
            return
        if arg:
            mechanism, sep, rest = arg.partition(" ")
            arg = mechanism.upper() + sep + rest  # mechanism names are case-insensitive
        await super().smtp_AUTH(arg)

    # aiosmtpd calls built-in auth_* methods as method(self, args).
    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("", encode_to_b64=False)
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
            assert isinstance(blob, bytes)
        elif args[1] == "=":
            blob = b""
        else:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            await self.push("501 5.5.2 PLAIN response must be authzid NUL user NUL password")
            return AuthResult(success=False, handled=True)
        if parts[0] and parts[0] != parts[1]:
            # As IMAP and POP3 do: the proxy logs in as the user, never on another's behalf.
            await self.push("535 5.7.8 Acting as another user (authzid) is not supported")
            return AuthResult(success=False, handled=True)
        return await self._log_in(parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            user = await self.challenge_auth(self.AuthLoginUsernameChallenge)
        else:
            try:
                user = base64.b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        if user is MISSING:
            return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        assert isinstance(user, bytes) and isinstance(password, bytes)
        return await self._log_in(user, password)

    async def _log_in(self, raw_user: bytes, raw_password: bytes) -> AuthResult:
        try:
            user, password = raw_user.decode("utf-8"), raw_password.decode("utf-8")
        except UnicodeDecodeError:
            await self.push("501 5.5.2 User name and password must be UTF-8")
            return AuthResult(success=False, handled=True)
        try:
            opened = await self.sessions.log_in(user, password, self.peer)
        except Refusal as refusal:
            self._auth_failures += 1
            if self._auth_failures >= MAX_AUTH_FAILURES:
                await self.push(f"421 4.7.0 {refusal.text}; too many failed logins, closing "
                                "connection")
                if self.transport is not None:
                    self.transport.close()
            else:
                await self.push(refusal_reply(refusal))
            return AuthResult(success=False, handled=True)
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        self.device = None  # logged in: the account's own rules from here on
        self._open(opened)
        return AuthResult(success=True, handled=False,
                          message="235 2.7.0 Authentication successful")

