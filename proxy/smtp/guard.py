"""aiosmtpd's ``SMTP`` made safe for any input: bounded lines, well-formed replies, log lines
without a client's control bytes, and a close that does not lose the last reply to a reset.

``SmtpFront`` builds on ``GuardedSMTP``; like the front, this module reaches into aiosmtpd's
internals where it has no public way: ``_reader`` and ``_writer`` (the client streams).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import MISSING, SMTP, syntax

from .replies import well_formed

# Longest line read outside DATA before the connection is closed: aiosmtpd reads the rest of
# an over-long line (to answer 500 at its end) without a bound.
MAX_DISCARD = 64 * 1024
# How long a closing connection waits for the client to close its side (see _Lingering).
LINGER = 2.0
# aiosmtpd's reply when a client sent too many unknown commands, after which it closes; a
# close may only follow 221 or 421 (RFC 5321 3.8).
_BOGUS_LIMIT_REPLY = "502 5.5.1 Too many unrecognized commands, goodbye."
_BOGUS_LIMIT_CLOSE = "421 4.7.0 Too many unrecognized commands, closing connection"


class _Printable(logging.Filter):
    """aiosmtpd logs a client's unknown command as it came: control bytes (terminal escapes)
    would reach an administrator's terminal. They are written as \\xNN instead."""

    _CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self._CONTROL.search(message):
            record.msg = self._CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", message)
            record.args = None
        return True


logging.getLogger("mail.log").addFilter(_Printable())


class _Lingering:
    """The transport as aiosmtpd sees it: ``close()`` sends what is written, then a FIN, and
    reads (and drops) what the client still sends until it closes too or LINGER passes. A
    plain close with unread input makes the kernel send a reset, which loses the last reply
    (a 221 or 421) under load."""

    def __init__(self, transport: asyncio.Transport, smtp: GuardedSMTP) -> None:
        self._transport = transport
        self._smtp = smtp

    def close(self) -> None:
        self._smtp.linger()

    def is_closing(self) -> bool:
        return self._smtp.lingering or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedSMTP(SMTP):
    """``SMTP`` with the guards above; ``in_data`` is set by the subclass while it reads a
    message (lines are not bounded there)."""

    in_data = False
    lingering = False
    tls_pending = False  # STARTTLS said go ahead, the handshake is not done: no plain text
    _line_bytes = 0  # read since the last LF, outside DATA
    _linger_handle: asyncio.TimerHandle | None = None
    _real: asyncio.Transport | None = None
    _client_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.tls_pending = False  # (again after a STARTTLS handshake)
        if self.transport is transport:
            # Every close goes through linger(): aiosmtpd's (QUIT, too many unknown
            # commands, a cancelled session) and ours.
            self._real = real = cast(asyncio.Transport, transport)
            self.transport = wrapped = cast(asyncio.Transport, _Lingering(real, self))
            self._writer._transport = wrapped  # type: ignore[attr-defined]

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if not arg and self.tls_context is not None and self._real is not None:
            # As for IMAP and POP3: what the client sent after STARTTLS without waiting for
            # the go-ahead is never read as a command (aiosmtpd drops it once the handshake
            # is done: here, before), and reading goes on: the reader pauses the connection
            # when its buffer is full, and the handshake would wait for bytes until a timeout.
            self._reader._buffer.clear()  # type: ignore[attr-defined]
            self._real.resume_reading()
            self.tls_pending = True
        await super().smtp_STARTTLS(arg)

    def linger(self) -> None:
        """Close without losing the last reply to a reset (see ``_Lingering``)."""
        transport = self._real
        if transport is None or self.lingering or transport.is_closing():
            return
        if self._client_eof or not transport.can_write_eof():
            transport.close()  # nothing more will come that could cause a reset
            return
        self.lingering = True
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        transport.write_eof()
        transport.resume_reading()  # the reader may have paused it: its buffer was full
        # abort(): a client that reads nothing would keep close() waiting for the buffer.
        self._linger_handle = self.loop.call_later(LINGER, transport.abort)

    def close_now(self) -> None:
        if self._real is not None:
            self._real.close()

    def eof_received(self) -> bool | None:
        self._client_eof = True
        if self.lingering:
            self.close_now()
            return False
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        if not self.in_data:
            end = data.rfind(b"\n")
            self._line_bytes = len(data) - end - 1 if end >= 0 else self._line_bytes + len(data)
            if self._line_bytes > MAX_DISCARD:
                if self._real is not None and not self._real.is_closing():
                    self._real.write(b"421 4.7.0 Line too long, closing connection\r\n")
                    self.linger()
                return
        super().data_received(data)

    def connection_lost(self, error: Exception | None) -> None:
        if self._linger_handle is not None:
            self._linger_handle.cancel()
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        """Only printable ASCII, lines of at most 512 octets, and no 502 before a close."""
        if self.lingering:
            return
        text = status if isinstance(status, str) else status.decode("utf-8", "surrogateescape")
        if text == _BOGUS_LIMIT_REPLY:
            text = _BOGUS_LIMIT_CLOSE
        await super().push(well_formed(text).encode("ascii"))

    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> Any:
        """aiosmtpd's, with a bounded response line: over 1,001 octets (RFC 4954 4 allows
        12,288, but PLAIN and LOGIN need far less) it is read to its end and refused, where
        aiosmtpd's raised and left the rest of the line to run as a command."""
        if isinstance(challenge, str):
            challenge = challenge.encode()
        await self.push(b"334 " + (base64.b64encode(challenge) if encode_to_b64 else challenge))
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as overrun:
            await self._discard_line(overrun.consumed)
            await self.push("500 5.5.6 Authentication exchange line is too long")
            return MISSING
        except asyncio.IncompleteReadError:
            return MISSING
        blob = line.strip()
        if blob == b"*":
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        try:
            return base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING

    async def _discard_line(self, consumed: int) -> None:
        """Throw away an over-long line up to and including its LF."""
        while True:
            await self._reader.readexactly(consumed)
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as overrun:
                consumed = overrun.consumed
