"""aiosmtpd's handler for the SMTP front: its hooks answer through the front that calls them
and the front's transaction; aiosmtpd writes the reply returned."""

from __future__ import annotations

from typing import Protocol

from aiosmtpd.smtp import Envelope, Session

from ..config import Device, Settings
from .replies import Reply
from .transaction import Transaction


class Front(Protocol):
    """What the hooks use of ``front.SmtpFront`` (not imported: it imports this module)."""

    hostname: str
    settings: Settings
    transaction: Transaction | None
    upstream_extensions: frozenset[str] | None
    device: Device | None  # a [[devices]] rule, until an AUTH

    def size_to_advertise(self) -> int: ...

    async def device_mail(self, device: Device, sender: str) -> Reply | None: ...


class Hooks:
    """aiosmtpd's handler: its hooks answer through the front that calls them (``server``)
    and its transaction; aiosmtpd writes the reply returned."""

    async def handle_EHLO(self, server: Front, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if server.transaction is not None:
            await server.transaction.abandon()  # EHLO resets the transaction (RFC 5321 4.1.4)
        keywords = [r[4:] for r in responses[1:]]
        # STARTTLS stays when aiosmtpd offers it (with a tls_context, none so far).
        keep = [k for k in keywords if k.split(" ")[0] not in ("SIZE", "HELP")]
        size = [f"250-SIZE {server.size_to_advertise()}"]
        offered = server.upstream_extensions
        if offered is not None:
            # Logged in: what reaches the upstream unchanged is offered only if it offers it.
            keep = [k for k in keep if k.split(" ")[0] not in ("8BITMIME", "SMTPUTF8")
                    or k.split(" ")[0].lower() in offered]
            if "dsn" in offered:
                keep.append("DSN")
            if "size" not in offered and not server.settings.smtp.max_message_size:
                size = []
        lines = [responses[0], *size, *keep, "250-ENHANCEDSTATUSCODES"]
        lines = [line if line.startswith("250-") else f"250-{line}" for line in lines]
        lines[-1] = "250 " + lines[-1][4:]
        return lines

    async def handle_HELO(self, server: Front, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        session.host_name = hostname
        if server.transaction is not None:
            await server.transaction.abandon()  # HELO resets it too (RFC 5321 4.1.4)
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: Front, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if server.device is not None:
            refused = await server.device_mail(server.device, address)
            if refused is not None:
                return refused
        if server.transaction is None:
            return "530 5.7.0 Authentication required"
        reply = await server.transaction.mail(address, options)
        if reply.code == 250:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return reply

    async def handle_RCPT(self, server: Front, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        assert server.transaction is not None
        reply = await server.transaction.rcpt(address, options)
        if reply.code in (250, 251):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return reply

    async def handle_RSET(self, server: Front, session: Session, envelope: Envelope) -> str:
        if server.transaction is None:
            return "250 2.0.0 OK"
        return await server.transaction.reset()

    async def handle_NOOP(self, server: Front, session: Session, envelope: Envelope,
                          arg: str) -> str:
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: Front, session: Session, envelope: Envelope) -> str:
        if server.transaction is not None:
            await server.transaction.quit()
        return "221 2.0.0 Bye"

    async def handle_VRFY(self, server: Front, session: Session, envelope: Envelope,
                          address: str) -> str:
        return "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery"
