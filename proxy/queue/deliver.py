"""The real ``Deliverer``: the account's upstream SMTP session (``proxy/smtp/upstream.py``),
logged in through the gate like the relay's, carrying queued messages."""

from __future__ import annotations

from collections.abc import AsyncIterable

from aiosmtplib import SMTPResponse

from ..config import Account
from ..login import Gate, Refusal
from ..smtp.upstream import SmtpUpstreamSession, UpstreamGone
from .upstream import Attempt, Reply, SessionLost, SessionRefused

# MAIL parameters passed on when the server announces their extension; others are dropped
# (SIZE is given again with the stored size by the server's rules, not the client's).
_PASSED = {"BODY": "8bitmime", "SMTPUTF8": "smtputf8", "SIZE": "size"}


def _reply(response: SMTPResponse) -> Reply:
    return Reply(response.code, response.message)


class SmtpDeliverer:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def waiting_for(self, account: Account) -> str | None:
        status = self.gate.tokens.status(account.key)
        if not status.get("authorized"):
            return (f"account {account.address} needs authorization "
                    f"({status.get('needs_authorization')}): run `mailproxy authorize "
                    f"{account.address}` or `mailproxy token import {account.address}`")
        if status.get("locked"):
            return (f"the token vault of {account.address} is locked: set [vault] master_key "
                    "or log in once with a client")
        return None

    async def open(self, account: Account) -> SmtpSession:
        try:
            upstream = SmtpUpstreamSession(account)
            await self.gate.relogin(account, upstream)
        except Refusal as refusal:
            raise SessionRefused(refusal.text,
                                 authorization=refusal.kind == "authorization") from None
        if not upstream.connected:
            upstream.close()
            raise SessionRefused(f"{upstream.description} closed the connection after login")
        return SmtpSession(upstream)


class SmtpSession:
    def __init__(self, upstream: SmtpUpstreamSession) -> None:
        self.upstream = upstream

    def _options(self, options: list[str]) -> list[str]:
        extensions = self.upstream.extensions
        kept = []
        for option in options:
            name = option.partition("=")[0].upper()
            if _PASSED.get(name) in extensions:
                kept.append(option)
        return kept

    async def send(self, sender: str, mail_options: list[str], recipients: list[str],
                   body: AsyncIterable[bytes]) -> Attempt:
        up = self.upstream
        try:
            mail = await up.mail(sender or "<>", self._options(mail_options))
            if mail.code != 250:
                return Attempt(_reply(mail))
            replies = {rcpt: _reply(await up.rcpt(rcpt, [])) for rcpt in recipients}
            if not any(reply.ok for reply in replies.values()):
                return Attempt(_reply(mail), replies)
            up.start_data()
            go = await up.data_reply()
            if go.code != 354:
                return Attempt(_reply(mail), replies, _reply(go))
            tail = b"\r\n"
            async for chunk in body:
                if chunk:
                    tail = (tail + chunk)[-2:]
                    if up.send(chunk):
                        await up.drain()
            up.send(b".\r\n" if tail == b"\r\n" else b"\r\n.\r\n")
            end = await up.finish_data()
        except UpstreamGone as exc:
            raise SessionLost(str(exc)) from None
        return Attempt(_reply(mail), replies, _reply(end))

    async def reset(self) -> None:
        try:
            response = await self.upstream.command(b"RSET")
        except UpstreamGone as exc:
            raise SessionLost(str(exc)) from None
        if response.code != 250:
            self.upstream.close()
            raise SessionLost(f"RSET answered {response.code} {response.message}")

    async def close(self) -> None:
        await self.upstream.quit()
