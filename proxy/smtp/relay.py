"""What one client session relays: the upstream session, MAIL/RCPT with the upstream's own
replies, and DATA streamed through (``data.pump``).

A message is acknowledged with 250 only when the upstream's reply to the end of the message
was 250; any failure on the way gives a 4xx (the client keeps the message and retries).
Unless ``[smtp] strict_one_to_one`` is set, two replies do not wait for the upstream: MAIL is
held back and sent with the first RCPT (when the upstream offers PIPELINING), and DATA gets
our 354 while the upstream's is on its way. Each saves a round trip per message; a refused
sender or DATA is then reported at the next reply, in the upstream's words.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING

from aiosmtpd.smtp import Envelope, Session
from aiosmtplib import SMTPResponse

from ..config import Account
from ..login import Refusal
from .data import Outcome, Result, pump
from .replies import format_reply, refusal_reply
from .upstream import DATA_END_TIMEOUT, SmtpUpstreamSession, UpstreamGone, one_line

if TYPE_CHECKING:
    from .front import SmtpFront, SmtpService

log = logging.getLogger("mailproxy.smtp")


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
                if upstream.pipelining and not self.service.settings.smtp.strict_one_to_one:
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
        """DATA: the message streamed through to the upstream; the reply for the client.

        DATA goes upstream at once and the client gets our 354 without waiting for the
        upstream's: the client's first bytes travel while the upstream answers, which saves
        a round trip per message. Nothing is written upstream before its 354; if it refuses
        DATA instead, the message is read and dropped and the client gets the upstream's
        refusal as the reply to its message. Either way the final verdict is the upstream's.
        With ``[smtp] strict_one_to_one`` the client gets the upstream's own reply to DATA.

        None when the client went away in the middle of the message (nobody to answer).
        """
        assert self.upstream is not None and self.account is not None
        assert front.envelope is not None
        upstream = self.upstream
        recipients = len(front.envelope.rcpt_tos)
        if self.broken:
            front.end_transaction()
            return self._lost("earlier in this transaction")
        strict = self.service.settings.smtp.strict_one_to_one
        refusal: SMTPResponse | None = None

        async def go_ahead() -> bool:
            nonlocal refusal
            reply = await upstream.data_reply()
            if reply.code == 354:
                return True
            refusal = reply
            return False

        try:
            upstream.start_data()
            if strict:
                response = await upstream.data_reply()
        except UpstreamGone as exc:
            front.end_transaction()
            return self._lost(str(exc))
        if not strict:
            await front.push("354 End data with <CR><LF>.<CR><LF>")
        elif response.code == 354:
            await front.push(format_reply(354, response.message))
        else:
            # The upstream's transaction is still open, and so is ours: the client decides.
            return format_reply(response.code, response.message)
        try:
            result = await pump(front._reader, upstream, front.data_size_limit,
                                front._reset_timeout, None if strict else go_ahead)
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
            # Logged once the reply is on its way (call_soon runs after this task's step,
            # which writes the reply): ~50 us a message off the time the client waits.
            asyncio.get_running_loop().call_soon(
                functools.partial(log.info, "smtp: %s -> %d recipient(s) via %s, %d bytes: %s",
                                  self.account.address, recipients, self.description,
                                  result.size, one_line(response)))
            return format_reply(response.code, response.message)
        if result.outcome is Outcome.UPSTREAM_LOST:
            return self._lost(result.error)
        if result.outcome is Outcome.REFUSED:
            assert refusal is not None
            log.info("smtp: %s refused DATA from %s: %s", self.description,
                     self.account.address, one_line(refusal))
            # Our client's transaction ends with this reply; the upstream's may still be open.
            await self._reset_upstream()
            return format_reply(refusal.code, refusal.message)
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
