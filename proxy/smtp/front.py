"""The local SMTP side: aiosmtpd on the daemon's own event loop, relaying one to one.

``SmtpFront`` (an aiosmtpd ``SMTP`` per connection) does AUTH PLAIN/LOGIN itself so the login
can await the gate; ``Relay`` (its handler) owns the upstream session and forwards MAIL, RCPT
and DATA, answering with the upstream's own reply. A message is acknowledged with 250 only
when the upstream's reply to the end of DATA was 250: any failure on the way gives a 4xx.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import socket
from typing import Any, AnyStr

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, syntax
from aiosmtplib import SMTPResponse

from .. import __version__
from ..config import Account, Settings
from ..login import Gate, Refusal
from .data import Outcome, Result, pump
from .replies import add_enhanced_codes, format_reply, refusal_reply
from .upstream import DATA_END_TIMEOUT, SmtpUpstreamSession, UpstreamGone, one_line

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


class Relay:
    """aiosmtpd handler for one client connection: the upstream session and the relay."""

    def __init__(self, service: SmtpService) -> None:
        self.service = service
        self.gate = service.gate
        self.account: Account | None = None
        self.upstream: SmtpUpstreamSession | None = None
        # The upstream dropped inside the current transaction: 4xx until RSET or MAIL.
        self.broken = False
        # The upstream accepted MAIL and has not seen the end of the transaction yet.
        self.in_transaction = False
        # MAIL accepted here, to be sent upstream with the first RCPT (sender, options).
        self.pending_mail: tuple[str, list[str]] | None = None

    @property
    def description(self) -> str:
        return self.upstream.description if self.upstream else "the upstream server"

    def attach(self, account: Account, upstream: SmtpUpstreamSession) -> None:
        self.account, self.upstream = account, upstream
        self.service.learn_size(upstream.size_limit)

    def close(self) -> None:
        if self.upstream is not None:
            self.upstream.close()

    def _lost(self, reason: str) -> str:
        log.warning("smtp: connection to %s lost during a transaction: %s", self.description,
                    reason)
        self.broken = True
        self.in_transaction = False
        self.pending_mail = None
        return format_reply(451, f"connection to {self.description} lost ({reason}); nothing "
                            "was sent, please try again", "4.4.2")

    async def _reconnect(self) -> None:
        assert self.account is not None
        if self.upstream is not None:
            self.upstream.close()
        upstream = SmtpUpstreamSession(self.account)
        await self.gate.relogin(self.account, upstream)
        log.info("smtp: reconnected to %s for %s", upstream.description, self.account.address)
        self.upstream = upstream

    # -- aiosmtpd hooks ------------------------------------------------------------------

    async def handle_EHLO(self, server: SmtpFront, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        self.pending_mail = None
        if self.in_transaction:
            await self._reset_upstream()  # EHLO resets the transaction (RFC 5321 4.1.4)
        keywords = [r[4:] for r in responses[1:]]
        keep = [k for k in keywords if k.split(" ")[0] not in ("SIZE", "HELP", "STARTTLS")]
        lines = [responses[0], f"250-SIZE {server.size_to_advertise()}", *keep,
                 "250-ENHANCEDSTATUSCODES"]
        lines = [line if line.startswith("250-") else f"250-{line}" for line in lines]
        lines[-1] = "250 " + lines[-1][4:]
        return lines

    async def handle_MAIL(self, server: SmtpFront, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        upstream = self.upstream
        if upstream is None:
            return "530 5.7.0 Authentication required"
        self.broken = False
        self.pending_mail = None
        for attempt in (1, 2):
            try:
                if not upstream.connected:
                    await self._reconnect()
                    assert self.upstream is not None
                    upstream = self.upstream
                if upstream.pipelining:
                    # MAIL goes upstream together with the first RCPT, saving a round trip
                    # per message; a refused sender is reported at that RCPT, as Postfix
                    # itself does by default (smtpd_delay_reject).
                    self.pending_mail = (address, options)
                    envelope.mail_from = address
                    envelope.mail_options.extend(options)
                    return "250 2.1.0 Ok"
                response = await upstream.mail(address, options)
            except Refusal as refusal:
                return refusal_reply(refusal)
            except UpstreamGone as exc:
                # Nothing is in flight before MAIL: reconnect once, transparently.
                if attempt == 2:
                    return format_reply(451, f"connection to {self.description} lost "
                                        f"({exc}); please try again", "4.4.2")
                log.info("smtp: %s dropped the idle connection (%s); reconnecting",
                         upstream.description, exc)
                upstream.close()
                continue
            break
        if response.code == 250:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
            self.in_transaction = True
        return format_reply(response.code, response.message)

    async def _mail_and_rcpt(self, address: str, options: list[str]) -> SMTPResponse:
        """The deferred MAIL and this RCPT, pipelined; the reply for the client's RCPT."""
        assert self.upstream is not None and self.pending_mail is not None
        sender, sender_options = self.pending_mail
        try:
            mail, rcpt = await self.upstream.mail_rcpt(sender, sender_options, address, options)
        except UpstreamGone as exc:
            # The server has no transaction yet either: a new connection, and again.
            log.info("smtp: %s dropped the idle connection (%s); reconnecting",
                     self.description, exc)
            await self._reconnect()
            assert self.upstream is not None
            mail, rcpt = await self.upstream.mail_rcpt(sender, sender_options, address, options)
        if mail.code != 250:
            # The RCPT's own reply only says that MAIL failed: give the sender's verdict.
            # MAIL stays pending: a further RCPT tries it again.
            return mail
        self.pending_mail = None
        self.in_transaction = True
        return rcpt

    async def handle_RCPT(self, server: SmtpFront, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        assert self.upstream is not None and self.account is not None
        if self.broken:
            return self._lost("earlier in this transaction")
        cap = self.account.smtp_max_recipients
        if cap is not None and len(envelope.rcpt_tos) >= cap:
            return format_reply(452, f"too many recipients: {self.description} takes at most "
                                f"{cap} per message; send the rest in another message", "4.5.3")
        try:
            if self.pending_mail is not None:
                response = await self._mail_and_rcpt(address, options)
            else:
                response = await self.upstream.rcpt(address, options)
        except Refusal as refusal:
            return refusal_reply(refusal)
        except UpstreamGone as exc:
            return self._lost(str(exc))
        if response.code in (250, 251):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return format_reply(response.code, response.message)

    async def data(self, front: SmtpFront) -> str | None:
        """DATA: upstream first, then the message streamed through; the reply for the client.

        None when the client went away in the middle of the message (nobody to answer).
        """
        assert self.upstream is not None and self.account is not None
        assert front.envelope is not None
        upstream = self.upstream
        recipients = len(front.envelope.rcpt_tos)
        if self.broken:
            front.end_transaction()
            return self._lost("earlier in this transaction")
        try:
            response = await upstream.start_data()
        except UpstreamGone as exc:
            front.end_transaction()
            return self._lost(str(exc))
        if response.code != 354:
            # The upstream's transaction is still open, and so is ours: the client decides.
            return format_reply(response.code, response.message)
        await front.push(format_reply(354, response.message))
        try:
            result = await pump(front._reader, upstream, front.data_size_limit,
                                front._reset_timeout)
            if result.outcome is Outcome.SENT:
                # The client is waiting for this reply, not idle (RFC 5321 4.5.3.2.6).
                front._reset_timeout(DATA_END_TIMEOUT + 60)
                try:
                    response = await upstream.finish_data()
                except UpstreamGone as exc:
                    result = Result(Outcome.UPSTREAM_LOST, result.size, str(exc))
        except BaseException:
            # Cancelled because the client went away, or a bug. Unless the end marker was
            # sent already, closing the upstream connection drops the partial message there;
            # and a client stopped in the middle of its message cannot be resynchronised
            # (its next lines would be read as commands).
            upstream.close()
            if front.transport is not None:
                front.transport.close()
            raise
        finally:
            self.in_transaction = False
            self.pending_mail = None
            front.end_transaction()
        if front.transport is not None:
            front._reset_timeout()
        if result.outcome is Outcome.SENT:
            log.info("smtp: %s -> %d recipient(s) via %s, %d bytes: %s", self.account.address,
                     recipients, self.description, result.size, one_line(response))
            return format_reply(response.code, response.message)
        if result.outcome is Outcome.UPSTREAM_LOST:
            return self._lost(result.error)
        # The upstream has part of the message and no end marker: only closing the
        # connection ends its transaction without delivering it. The next MAIL reconnects.
        upstream.close()
        if result.outcome is Outcome.CLIENT_GONE:
            log.info("smtp: the client of %s went away in the middle of a message",
                     self.account.address)
            return None
        log.info("smtp: message from %s refused: over the size limit of %s bytes",
                 self.account.address, front.data_size_limit)
        return format_reply(552, f"message exceeds the size limit of {front.data_size_limit} "
                            "bytes; nothing was sent", "5.3.4")

    async def _reset_upstream(self) -> str:
        self.broken = self.in_transaction = False
        self.pending_mail = None
        if self.upstream is not None and self.upstream.connected:
            try:
                response = await self.upstream.command(b"RSET")
            except UpstreamGone:
                pass  # the next MAIL reconnects
            else:
                return format_reply(response.code, response.message)
        return "250 2.0.0 OK"

    async def handle_RSET(self, server: SmtpFront, session: Session, envelope: Envelope) -> str:
        return await self._reset_upstream()

    async def handle_NOOP(self, server: SmtpFront, session: Session, envelope: Envelope,
                          arg: str) -> str:
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: SmtpFront, session: Session, envelope: Envelope) -> str:
        if self.upstream is not None:
            await self.upstream.quit()
        return "221 2.0.0 Bye"

    async def handle_VRFY(self, server: SmtpFront, session: Session, envelope: Envelope,
                          address: str) -> str:
        return "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery"

    async def handle_exception(self, error: Exception) -> str:
        log.error("smtp session error: %s", error, exc_info=error)
        # Never anything that could read as success: the client keeps the message and retries.
        return "451 4.3.0 Internal error in mailproxy; please try again"


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
        transport = self.transport
        if transport is not None and not transport.is_closing():
            assert isinstance(transport, asyncio.WriteTransport)
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
