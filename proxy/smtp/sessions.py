"""How an SMTP connection gets its destination: ``Sessions`` (what the front asks, at AUTH or
at a device's first MAIL; ``service.SmtpService`` answers), ``Opened`` (the account, its
transaction, its size limit, the upstream's extensions) and the device-rule refusal."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from ..config import Account, Device
from .replies import Reply, format_reply
from .transaction import Transaction

log = logging.getLogger("mailproxy.smtp")

@dataclass(frozen=True)
class Opened:
    """What a session may send through once it logged in (or is a device): its account, its
    transaction, and the largest message its destination takes (None: not known)."""

    account: Account
    transaction: Transaction
    size_limit: int | None = None
    # What the upstream announced in its EHLO (lower-case names); None when the message is
    # not relayed as it arrives (the queue), so the front offers its own extensions.
    extensions: frozenset[str] | None = None


class Sessions(Protocol):
    """How a connection gets its transaction (``service.SmtpService``); both ways raise
    ``Refusal``."""

    async def log_in(self, user: str, password: str, peer: str) -> Opened:
        """AUTH with a local password, from the client address ``peer``."""
        ...

    def device_for(self, host: str) -> Device | None:
        """The device rule for a connection from ``host``, if any."""
        ...

    async def open_device(self, device: Device) -> Opened:
        """A device's session, at its first MAIL."""
        ...


def device_refusal(device: Device, sender: str, peer: object) -> Reply:
    """The reply (and the log line) for a device's sender outside its list."""
    log.warning("smtp: device %r (%s) refused: sender <%s> not in its list", device.name,
                peer, sender)
    allowed = ", ".join(device.senders)
    return format_reply(550, f"sender <{sender}> is not allowed for device {device.name!r} "
                        f"([[devices]] senders: {allowed}); the sender is never rewritten",
                        "5.7.1")
