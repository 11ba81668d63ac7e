"""The local SMTP side: aiosmtpd on the daemon's own event loop, relaying one to one.

``SmtpFront`` (an aiosmtpd ``SMTP`` per connection) does AUTH PLAIN/LOGIN itself so the login
can await the gate, and replaces aiosmtpd's DATA with a streamed one; ``Relay`` (its handler,
relay.py) owns the upstream session and answers with the upstream's own replies.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import socket
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Session, syntax

from .. import __version__
from ..config import Settings
from ..login import Gate, Refusal
from .relay import Relay
from .replies import add_enhanced_codes, refusal_reply
from .upstream import SmtpUpstreamSession

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


class SmtpFront(SMTP):
    """aiosmtpd's SMTP with our AUTH (awaiting the gate) and RFC 2034 reply codes."""

    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, relay: Relay, settings: Settings, hostname: str) -> None:
        super().__init__(
            relay, hostname=hostname, ident=f"mailproxy {__version__} ESMTP",
            data_size_limit=None, enable_SMTPUTF8=True, decode_data=False,
            timeout=settings.smtp.idle_timeout, auth_require_tls=False,
            loop=asyncio.get_running_loop())
        # Set after __init__: passing auth_required with auth_require_tls=False makes
        # aiosmtpd warn on every connection. The listener is meant for loopback.
        self._auth_required = True
        self.relay = relay
        self.settings = settings
        self._verbatim = False
        self._deadline = 0.0  # of the idle timer, see _reset_timeout

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
        return self.settings.smtp.max_message_size or self.relay.service.size_hint or DEFAULT_SIZE

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
        reply = await self.relay.data(self)
        if reply is None:
            if self.transport is not None:
                self.transport.close()
            return
        await self.push(reply)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self.relay.close()
        self.relay.service.fronts.discard(self)

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
            account, upstream = await self.relay.gate.log_in(
                "smtp", user, password, SmtpUpstreamSession)
        except Refusal as refusal:
            await self.push(refusal_reply(refusal))
            return AuthResult(success=False, handled=True)
        assert isinstance(upstream, SmtpUpstreamSession)
        self.relay.attach(account, upstream)
        self.data_size_limit = (self.settings.smtp.max_message_size or upstream.size_limit
                                or DEFAULT_SIZE)
        return AuthResult(success=True, handled=False,
                          message="235 2.7.0 Authentication successful")


class SmtpService:
    """The SMTP listener of the daemon and the connections it has open."""

    def __init__(self, gate: Gate, settings: Settings) -> None:
        self.gate = gate
        self.settings = settings
        self.hostname = socket.gethostname() or "localhost"
        self.fronts: set[SmtpFront] = set()
        self.size_hint = 0

    def learn_size(self, size: int | None) -> None:
        # Advertised before login, when the account (and its server) is not known yet.
        if size:
            self.size_hint = size

    def _make(self) -> SmtpFront:
        front = SmtpFront(Relay(self), self.settings, self.hostname)
        self.fronts.add(front)
        return front

    async def start(self, host: str, port: int, backlog: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(self._make, host, port, backlog=backlog,
                                        reuse_address=True)

    async def drain(self, grace: float) -> None:
        """Let sessions in progress finish for ``grace`` seconds, then cut them off."""
        tasks = {f._handler_coroutine for f in self.fronts if f._handler_coroutine is not None}
        pending: set[asyncio.Task[None]] = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
        for front in list(self.fronts):
            if front.transport is not None:
                front.transport.close()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
