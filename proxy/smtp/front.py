"""The local SMTP side: aiosmtpd on the daemon's own event loop, and all client I/O.

``SmtpFront`` (an aiosmtpd ``SMTP`` per connection) does AUTH PLAIN/LOGIN itself so the login
can await the gate, answers MAIL, RCPT, RSET and QUIT with what the session's
``transaction.Transaction`` replies, and replaces aiosmtpd's DATA with a streamed one: it
reads the message (``data.pump``) into the transaction's sink and writes every reply itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import ssl
from collections.abc import Callable
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, syntax

from .. import __version__
from ..config import Account, Settings
from ..login import Gate, Refusal
from .data import Outcome, pump
from .replies import Reply, add_enhanced_codes, format_reply, refusal_reply
from .transaction import OpenTransaction, Transaction
from .upstream import DATA_END_TIMEOUT, SmtpUpstreamSession

log = logging.getLogger("mailproxy.smtp")

# Without a configured limit and before any upstream told us its SIZE.
DEFAULT_SIZE = 35 * 1024 * 1024
# aiosmtpd's own per-command logging would show addresses at INFO; we log our own summary.
logging.getLogger("mail.log").setLevel(logging.WARNING)
# "<dot-atom@domain> params": the everyday MAIL/RCPT argument, for which aiosmtpd's parser
# (the email package's header parser, ~45 us an address) gives exactly the text between <>.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
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


class SizeHint:
    """The SIZE advertised before login, when the account (and its server) is not known yet:
    the last one an upstream announced. Shared by the fronts of one listener."""

    def __init__(self) -> None:
        self.size = 0

    def learn(self, size: int | None) -> None:
        if size:
            self.size = size


class SmtpFront(SMTP):
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

    def __init__(self, settings: Settings, hostname: str, gate: Gate,
                 open_transaction: OpenTransaction, size_hint: SizeHint,
                 on_lost: Callable[[SmtpFront], None], *,
                 tls_context: ssl.SSLContext | None = None, tls_required: bool = False) -> None:
        """``tls_context``: offer STARTTLS with it; ``tls_required``: no AUTH before it."""
        super().__init__(
            _Hooks(), hostname=hostname, ident=f"mailproxy {__version__} ESMTP",
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
        self.gate = gate
        self.open_transaction = open_transaction
        self.size_hint = size_hint
        self.on_lost = on_lost
        self.account: Account | None = None
        # Where this session's mail goes, once logged in.
        self.transaction: Transaction | None = None
        self._verbatim = False
        self._deadline = 0.0  # of the idle timer, see _reset_timeout

    @property
    def session_task(self) -> asyncio.Task[None] | None:
        """The task that runs this connection's dialogue (aiosmtpd's)."""
        return self._handler_coroutine

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        match = _SIMPLE_PATH.fullmatch(arg.lstrip())
        if match is None or (self.local_part_limit
                             and len(match["local"]) > self.local_part_limit):
            return super()._getaddr(arg)  # the null path, quoting, UTF-8, literals, ...
        path = match.group(0)
        return path[1:path.index(">")], match["rest"]

    def size_to_advertise(self) -> int:
        if self.data_size_limit:
            return self.data_size_limit
        return self.settings.smtp.max_message_size or self.size_hint.size or DEFAULT_SIZE

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
        # A stream transport; uvloop's are not subclasses of asyncio.WriteTransport.
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(b"421 4.4.2 Idle for too long, closing connection\r\n")
            transport.close()  # connection_lost() cleans up, as in aiosmtpd's own callback

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
        reply = await self._data()
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
        log.error("smtp session error: %s", error, exc_info=error)
        # Never anything that could read as success: the client keeps the message and retries.
        return "451 4.3.0 Internal error in mailproxy; please try again"

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if self.transaction is not None:
            self.transaction.close()
        self.on_lost(self)

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            if not self._verbatim:
                status = add_enhanced_codes(status)
            await super().push(status.encode("utf-8", "surrogateescape"))
        else:
            await super().push(status)

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
            account, upstream = await self.gate.log_in(
                "smtp", user, password, SmtpUpstreamSession)
        except Refusal as refusal:
            await self.push(refusal_reply(refusal))
            return AuthResult(success=False, handled=True)
        assert isinstance(upstream, SmtpUpstreamSession)
        self.account = account
        self.transaction = self.open_transaction(account, upstream)
        self.size_hint.learn(upstream.size_limit)
        self.data_size_limit = (self.settings.smtp.max_message_size or upstream.size_limit
                                or DEFAULT_SIZE)
        return AuthResult(success=True, handled=False,
                          message="235 2.7.0 Authentication successful")


class _Hooks:
    """aiosmtpd's handler: its hooks answer through the front that calls them (``server``)
    and its transaction; aiosmtpd writes the reply returned."""

    async def handle_EHLO(self, server: SmtpFront, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if server.transaction is not None:
            await server.transaction.abandon()  # EHLO resets the transaction (RFC 5321 4.1.4)
        keywords = [r[4:] for r in responses[1:]]
        # STARTTLS stays: aiosmtpd lists it only where local TLS is offered and not on yet.
        keep = [k for k in keywords if k.split(" ")[0] not in ("SIZE", "HELP")]
        lines = [responses[0], f"250-SIZE {server.size_to_advertise()}", *keep,
                 "250-ENHANCEDSTATUSCODES"]
        lines = [line if line.startswith("250-") else f"250-{line}" for line in lines]
        lines[-1] = "250 " + lines[-1][4:]
        return lines

    async def handle_MAIL(self, server: SmtpFront, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if server.transaction is None:
            return "530 5.7.0 Authentication required"
        reply = await server.transaction.mail(address, options)
        if reply.code == 250:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return reply

    async def handle_RCPT(self, server: SmtpFront, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        assert server.transaction is not None
        reply = await server.transaction.rcpt(address, options)
        if reply.code in (250, 251):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return reply

    async def handle_RSET(self, server: SmtpFront, session: Session, envelope: Envelope) -> str:
        if server.transaction is None:
            return "250 2.0.0 OK"
        return await server.transaction.reset()

    async def handle_NOOP(self, server: SmtpFront, session: Session, envelope: Envelope,
                          arg: str) -> str:
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: SmtpFront, session: Session, envelope: Envelope) -> str:
        if server.transaction is not None:
            await server.transaction.quit()
        return "221 2.0.0 Bye"

    async def handle_VRFY(self, server: SmtpFront, session: Session, envelope: Envelope,
                          address: str) -> str:
        return "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery"
