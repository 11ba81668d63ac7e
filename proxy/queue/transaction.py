"""The outbound queue as a ``smtp.transaction.Transaction``: the client's message goes into the
spool, and the client gets 250 only once it is durable (``Reception.commit``); the account's
delivery worker sends it later. Replies are the queue's own: recipients are accepted here and
judged by the server at delivery (a refusal then comes back as a DSN)."""

from __future__ import annotations

import logging

from ..config import Account
from ..smtp.data import SinkGone
from ..smtp.replies import Reply, format_reply
from ..smtp.transaction import DataStart
from .service import QueueService
from .spool import QueueFull, Reception, Spool

log = logging.getLogger("mailproxy.queue")

_GO_AHEAD = Reply("354 End data with <CR><LF>.<CR><LF>")


class _Sink:
    """``data.Sink`` over a reception: chunks gathered in memory, written in a thread."""

    def __init__(self, reception: Reception) -> None:
        self.reception = reception

    def send(self, data: bytes) -> bool:
        return self.reception.add(data)

    async def drain(self) -> None:
        try:
            await self.reception.flush()
        except OSError as exc:
            raise SinkGone(f"cannot write to the queue: {exc.strerror or exc}") from None


def _full(exc: QueueFull) -> Reply:
    return format_reply(452, f"{exc}; nothing was queued", "4.3.1")


class QueueTransaction:
    def __init__(self, account: Account, service: QueueService) -> None:
        self.account = account
        self.service = service
        self.sender: str | None = None
        self.options: list[str] = []
        self.recipients: list[str] = []
        self.reception: Reception | None = None

    def _clear(self) -> None:
        self.sender, self.options, self.recipients = None, [], []

    async def mail(self, sender: str, options: list[str]) -> Reply:
        self._drop()
        self._clear()
        try:
            await self._spool().check_space()
        except QueueFull as exc:
            return _full(exc)
        self.sender, self.options = sender, list(options)
        return format_reply(250, "Ok", "2.1.0")

    async def rcpt(self, recipient: str, options: list[str]) -> Reply:
        if self.sender is None:
            return format_reply(503, "need MAIL command", "5.5.1")
        cap = self.account.smtp_max_recipients
        if cap is not None and len(self.recipients) >= cap:
            return format_reply(452, f"too many recipients: the account's server takes at "
                                f"most {cap} per message; send the rest in another message",
                                "4.5.3")
        self.recipients.append(recipient)
        return format_reply(250, "Ok", "2.1.5")

    async def data(self) -> DataStart:
        assert self.sender is not None and self.recipients
        spool = self._spool()
        try:
            await spool.check_space()
        except QueueFull as exc:
            self._clear()
            return DataStart(_full(exc), ended=True)
        self.reception = spool.receive(self.account.key, self.sender, self.recipients,
                                       self.options)
        return DataStart(_GO_AHEAD, sink=_Sink(self.reception))

    async def finish(self, size: int) -> Reply:
        reception, self.reception = self.reception, None
        assert reception is not None
        self._clear()
        try:
            record = await reception.commit(size=size)
        except QueueFull as exc:
            log.warning("queue: message for %s refused: %s", self.account.address, exc)
            return _full(exc)
        except OSError as exc:
            log.error("queue: cannot queue a message for %s: %s", self.account.address, exc)
            return format_reply(451, f"cannot write the message to the queue "
                                f"({exc.strerror or exc}); please try again", "4.3.0")
        self.service.wake(self.account.key)
        log.info("queue: %s queued for %s: %d recipient(s), %d bytes", record.id,
                 self.account.address, len(record.recipients), record.size)
        return format_reply(250, f"Ok: queued as {record.id}", "2.0.0")

    def failed(self, reason: str) -> Reply:
        self._drop()
        self._clear()
        return format_reply(451, f"{reason}; nothing was queued, please try again", "4.3.0")

    async def refused(self) -> Reply:  # never: no ready() is given
        return self.failed("the queue refused the message")

    def abort(self) -> None:
        self._drop()
        self._clear()

    async def reset(self) -> Reply:
        self.abort()
        return format_reply(250, "OK", "2.0.0")

    async def abandon(self) -> None:
        self.abort()

    async def quit(self) -> None:
        self.abort()

    def close(self) -> None:
        self.abort()

    def _drop(self) -> None:
        reception, self.reception = self.reception, None
        if reception is not None:
            self.service.abandon(reception)

    def _spool(self) -> Spool:
        spool = self.service.spool
        assert spool is not None
        return spool
