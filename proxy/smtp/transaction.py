"""Where a client session's mail goes: the ``Transaction`` protocol the front calls (MAIL,
RCPT, DATA started, streamed and finished, RSET), and ``Relay``, its implementation that
relays each command to the account's upstream server and answers with the server's replies.

A transaction never sees the client: the front (front.py) reads every command and the message
and writes every reply; it asks the transaction and passes its ``Reply`` on. A second
implementation (the outbound queue, taking the message instead of the upstream) plugs in
through ``OpenTransaction`` without touching the front's DATA path or the relay.

The relay acknowledges a message with 250 only when the upstream's reply to the end of the
message was 250; any failure on the way gives a 4xx (the client keeps the message and
retries). Unless ``[smtp] strict_one_to_one`` is set, two replies do not wait for the
upstream: MAIL is held back and sent with the first RCPT (when the upstream offers
PIPELINING), and DATA gets our 354 while the upstream's is on its way. Each saves a round trip
per message; a refused sender or DATA is then reported at the next reply, in the upstream's
words.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from aiosmtplib import SMTPResponse

from ..config import Account, Settings
from ..login import Gate, Refusal
from .data import Sink
from .pool import SessionPool
from .replies import Reply, format_reply, refusal_reply
from .upstream import SmtpUpstreamSession, UpstreamGone, one_line

log = logging.getLogger("mailproxy.smtp")

# Our go-ahead, given while the upstream's is on its way.
LOCAL_GO_AHEAD = Reply("354 End data with <CR><LF>.<CR><LF>")


@dataclass(frozen=True, slots=True)
class DataStart:
    """The answer to DATA (``Transaction.data``).

    With a ``sink``, ``reply`` is the 354 to give the client, and the message goes into the
    sink (``data.pump``); ``ready``, if set, is awaited before the first byte is written (the
    354 given was not the destination's own): False means the destination refused after all
    (then ``Transaction.refused`` gives the reply). Without a sink, ``reply`` answers DATA and
    no message follows: ``ended`` says whether the transaction is over (the front forgets its
    envelope) or still open (a refusal; the client decides: RSET, or DATA again).
    """

    reply: Reply
    sink: Sink | None = None
    ready: Callable[[], Awaitable[bool]] | None = None
    ended: bool = False


class Transaction(Protocol):
    """The destination side of one client session's mail transactions, one after another.

    The front calls these in SMTP order, after a successful AUTH, and passes each ``Reply`` to
    the client unchanged (2xx/3xx accept, 4xx temporary, 5xx permanent, RFC 2034 enhanced
    codes included; ``replies.format_reply`` makes them). Client I/O is the front's alone: a
    transaction never reads from or writes to the client, nor moves its idle timer. A call is
    never made while another one on the same object is running.

    One transaction: ``mail``, ``rcpt`` (one or more), ``data``, the message written into the
    ``DataStart.sink``, then exactly one of ``finish`` (the whole message is in the sink),
    ``failed`` (the sink raised ``SinkGone``), ``refused`` (``DataStart.ready`` said no) or
    ``abort`` (the message will not be completed). ``reset`` or ``abandon`` may end it early.
    """

    async def mail(self, sender: str, options: list[str]) -> Reply:
        """MAIL FROM (``sender`` as aiosmtpd parsed it, "<>" for the null path; ``options``
        upper-cased). A new transaction starts: forget any recipients. With 250 the front
        records the sender; otherwise the client may try MAIL again."""
        ...

    async def rcpt(self, recipient: str, options: list[str]) -> Reply:
        """RCPT TO. With 250 or 251 the front records the recipient; the destination counts
        its own recipients (a cap is its business: 452 4.5.3 past it)."""
        ...

    async def data(self) -> DataStart:
        """DATA, once at least one recipient was accepted: where the message goes, or why
        not (see ``DataStart``)."""
        ...

    async def finish(self, size: int) -> Reply:
        """The whole message (``size`` bytes as sent, dot-stuffed, without the final ".\\r\\n")
        went into the sink, end marker included: the destination's verdict on it. Only a 250
        says the message is taken; if the destination broke meanwhile, a 4xx."""
        ...

    def failed(self, reason: str) -> Reply:
        """The sink or ``ready`` raised ``SinkGone(reason)``: nothing was delivered. The reply
        (4xx); the transaction is over."""
        ...

    async def refused(self) -> Reply:
        """``DataStart.ready`` said no: the destination's refusal of DATA, as the reply to the
        client's message (which was read and dropped); the transaction is over."""
        ...

    def abort(self) -> None:
        """The message will not be completed (over the size limit, the client went away, the
        session was cancelled): drop what the sink took; the transaction is over."""
        ...

    async def reset(self) -> Reply:
        """RSET: end the transaction, if any; the reply."""
        ...

    async def abandon(self) -> None:
        """EHLO (RFC 5321 4.1.4: a reset too): end any transaction quietly; the front answers
        EHLO itself."""
        ...

    async def quit(self) -> None:
        """QUIT: end the session politely (the front answers 221 and closes)."""
        ...

    def close(self) -> None:
        """The client connection is gone: release everything now (no awaiting)."""
        ...


# How a session that logged in gets its transaction: the account and its upstream session
# (logged in by the gate). The service picks the implementation.
OpenTransaction = Callable[[Account, SmtpUpstreamSession], Transaction]


class Relay:
    """``Transaction`` relayed one to one to the account's upstream server."""

    def __init__(self, account: Account, upstream: SmtpUpstreamSession, gate: Gate,
                 settings: Settings, pool: SessionPool[SmtpUpstreamSession] | None = None
                 ) -> None:
        """``pool``: where the upstream session goes when the client is done with it and it
        is idle (logged in, no transaction open), for the account's next client."""
        self.pool = pool
        self.released = False
        self.account = account
        self.upstream = upstream
        self.gate = gate
        self.settings = settings
        # The upstream dropped inside the current transaction: 4xx until RSET or MAIL.
        self.broken = False
        # The upstream accepted MAIL and has not seen the end of the transaction yet.
        self.in_transaction = False
        # MAIL accepted here, to be sent upstream with the first RCPT (sender, options).
        self.pending_mail: tuple[str, list[str]] | None = None
        self.recipients = 0  # accepted in this transaction
        self.refusal: SMTPResponse | None = None  # the upstream's answer to DATA, if not 354

    @property
    def description(self) -> str:
        return self.upstream.description

    @property
    def strict(self) -> bool:
        return self.settings.smtp.strict_one_to_one

    def close(self) -> None:
        if not self.released:
            self._release()

    def _release(self) -> None:
        """Hand the upstream session to the pool if it is idle and logged in, else close it."""
        self.released = True
        idle = not (self.in_transaction or self.pending_mail or self.broken)
        if self.pool is not None and idle and self.upstream.connected:
            self.pool.give(self.account.key, self.upstream)
        else:
            self.upstream.close()

    def _lost(self, reason: str, *, after_end: bool = False) -> Reply:
        log.warning("smtp: connection to %s lost during a transaction%s: %s", self.description,
                    " after the end of the message" if after_end else "", reason)
        self.broken = True
        self.in_transaction = False
        self.pending_mail = None
        if after_end:
            # The upstream had the whole message: it may have delivered it before the loss.
            return format_reply(451, f"connection to {self.description} lost after the end "
                                f"of the message ({reason}); the message may have been sent: "
                                "check before sending it again", "4.4.2")
        return format_reply(451, f"connection to {self.description} lost ({reason}); nothing "
                            "was sent, please try again", "4.4.2")

    def _ended(self) -> None:
        self.in_transaction = False
        self.pending_mail = None

    async def _reconnect(self) -> None:
        self.upstream.close()
        upstream = SmtpUpstreamSession(self.account)
        await self.gate.relogin(self.account, upstream)
        log.info("smtp: reconnected to %s for %s", upstream.description, self.account.address)
        self.upstream = upstream

    # -- envelope ------------------------------------------------------------------------

    async def mail(self, sender: str, options: list[str]) -> Reply:
        upstream = self.upstream
        self.broken = False
        self.pending_mail = None
        self.recipients = 0
        for attempt in (1, 2):
            try:
                if not upstream.connected:
                    await self._reconnect()
                    upstream = self.upstream
                if upstream.pipelining and not self.strict:
                    # MAIL goes upstream together with the first RCPT, saving a round trip
                    # per message; a refused sender is reported at that RCPT, as Postfix
                    # itself does by default (smtpd_delay_reject).
                    self.pending_mail = (sender, options)
                    return Reply("250 2.1.0 Ok")
                response = await upstream.mail(sender, options)
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
            self.in_transaction = True
        return format_reply(response.code, response.message)

    async def _mail_and_rcpt(self, address: str, options: list[str]) -> SMTPResponse:
        """The deferred MAIL and this RCPT, pipelined; the reply for the client's RCPT."""
        assert self.pending_mail is not None
        sender, sender_options = self.pending_mail
        try:
            mail, rcpt = await self.upstream.mail_rcpt(sender, sender_options, address, options)
        except UpstreamGone as exc:
            # The server has no transaction yet either: a new connection, and again.
            log.info("smtp: %s dropped the idle connection (%s); reconnecting",
                     self.description, exc)
            await self._reconnect()
            mail, rcpt = await self.upstream.mail_rcpt(sender, sender_options, address, options)
        if mail.code != 250:
            # The RCPT's own reply only says that MAIL failed: give the sender's verdict.
            # MAIL stays pending: a further RCPT tries it again.
            return mail
        self.pending_mail = None
        self.in_transaction = True
        return rcpt

    async def rcpt(self, recipient: str, options: list[str]) -> Reply:
        if self.broken:
            return self._lost("earlier in this transaction")
        cap = self.account.smtp_max_recipients
        if cap is not None and self.recipients >= cap:
            return format_reply(452, f"too many recipients: {self.description} takes at most "
                                f"{cap} per message; send the rest in another message", "4.5.3")
        try:
            if self.pending_mail is not None:
                response = await self._mail_and_rcpt(recipient, options)
            else:
                response = await self.upstream.rcpt(recipient, options)
        except Refusal as refusal:
            return refusal_reply(refusal)
        except UpstreamGone as exc:
            return self._lost(str(exc))
        if response.code in (250, 251):
            self.recipients += 1
        return format_reply(response.code, response.message)

    # -- the message ---------------------------------------------------------------------

    async def data(self) -> DataStart:
        """DATA goes upstream at once and, unless strict, the client gets our 354 without
        waiting for the upstream's: the client's first bytes travel while the upstream
        answers, which saves a round trip per message. Nothing is written upstream before its
        354 (``ready``); if it refuses DATA instead, the message is read and dropped and the
        client gets the upstream's refusal as the reply to its message (``refused``). Either
        way the final verdict is the upstream's. With ``[smtp] strict_one_to_one`` the client
        gets the upstream's own reply to DATA."""
        upstream = self.upstream
        self.refusal = None
        if self.broken:
            return DataStart(self._lost("earlier in this transaction"), ended=True)
        try:
            upstream.start_data()
            if self.strict:
                response = await upstream.data_reply()
        except UpstreamGone as exc:
            return DataStart(self._lost(str(exc)), ended=True)
        if not self.strict:
            return DataStart(LOCAL_GO_AHEAD, upstream, self._go_ahead)
        if response.code == 354:
            return DataStart(format_reply(354, response.message), upstream)
        # The upstream's transaction is still open, and so is ours: the client decides.
        return DataStart(format_reply(response.code, response.message))

    async def _go_ahead(self) -> bool:
        reply = await self.upstream.data_reply()
        if reply.code == 354:
            return True
        self.refusal = reply
        return False

    async def finish(self, size: int) -> Reply:
        self._ended()
        try:
            response = await self.upstream.finish_data()
        except UpstreamGone as exc:
            self.gate.observer.smtp_message("failed")
            return self._lost(str(exc), after_end=True)
        self.gate.observer.smtp_message("accepted" if response.code < 300 else
                                        "failed" if response.code < 500 else "rejected")
        # Logged once the reply is on its way (call_soon runs after this task's step, which
        # writes the reply): ~50 us a message off the time the client waits.
        asyncio.get_running_loop().call_soon(
            functools.partial(log.info, "smtp: %s -> %d recipient(s) via %s, %d bytes: %s",
                              self.account.address, self.recipients, self.description, size,
                              one_line(response)))
        return format_reply(response.code, response.message)

    def failed(self, reason: str) -> Reply:
        return self._lost(reason)

    async def refused(self) -> Reply:
        refusal = self.refusal
        assert refusal is not None
        log.info("smtp: %s refused DATA from %s: %s", self.description, self.account.address,
                 one_line(refusal))
        # Our client's transaction ends with this reply; the upstream's may still be open.
        await self.reset()
        return format_reply(refusal.code, refusal.message)

    def abort(self) -> None:
        # The upstream may have part of the message and no end marker: only closing the
        # connection ends its transaction without delivering it. The next MAIL reconnects.
        self._ended()
        self.upstream.close()

    # -- the session ---------------------------------------------------------------------

    async def reset(self) -> Reply:
        self.broken = self.in_transaction = False
        self.pending_mail = None
        if self.upstream.connected:
            try:
                response = await self.upstream.command(b"RSET")
            except UpstreamGone:
                pass  # the next MAIL reconnects
            else:
                return format_reply(response.code, response.message)
        return Reply("250 2.0.0 OK")

    async def abandon(self) -> None:
        self.pending_mail = None
        if self.in_transaction:
            await self.reset()

    async def quit(self) -> None:
        if self.pool is not None:
            if self.pending_mail is not None or self.in_transaction:
                await self.reset()
            self._release()  # logged in and idle: kept for the next client
            return
        await self.upstream.quit()
