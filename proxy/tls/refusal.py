"""A TLS handshake that fails ends with its alert and a clean close, not a bare TCP close.

When OpenSSL refuses a handshake (a TLS 1.0 ClientHello against ``tls_min_version = "1.2"``, no
cipher in common, a certificate the client rejects) it writes the alert that says why
(protocol_version, handshake_failure, ...) into the connection's outgoing buffer. asyncio's
``SSLProtocol`` then calls ``_fatal_error``, which force-closes the socket and drops that
buffer: the client never gets the alert, only an EOF it reports as "unexpected eof" (or a reset
when it had sent more, which the kernel answers with RST when a socket is closed unread).

Here the alert goes out, then a FIN; what the client still sends is read and dropped until it
closes its side too (at most ``LINGER`` seconds), so the alert is not lost to a reset. Whoever
waits for the handshake (``start_tls``, a listener's accept) hears of the failure only then:
``start_tls`` closes the socket as soon as it does.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
from typing import Any

_Base: Any = asyncio.sslproto.SSLProtocol
LINGER = 2.0  # seconds to wait for the client to close after the alert


class AlertingSSLProtocol(_Base):  # type: ignore[misc]  # asyncio.sslproto is untyped
    """``SSLProtocol`` that sends the alert of a failed handshake and closes cleanly."""

    _handshake_failing = False
    _after_alert = False
    _linger: asyncio.TimerHandle | None = None
    _held: BaseException | None = None  # the handshake's error, told at the close

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        self._handshake_failing = handshake_exc is not None
        try:
            super()._on_handshake_complete(handshake_exc)
        finally:
            self._handshake_failing = False

    def _fatal_error(self, exc: BaseException, message: str = "Fatal error on transport"
                     ) -> None:
        transport = self._transport
        # An SSLError in a failing handshake: OpenSSL has written its alert. (An EOF or a
        # timeout in the handshake is no SSLError: nobody is there to read an alert.)
        if (not self._handshake_failing or not isinstance(exc, ssl.SSLError)
                or transport is None or transport.is_closing()):
            super()._fatal_error(exc, message)
            return
        self._close_after_alert(transport)

    def _close_after_alert(self, transport: asyncio.Transport) -> None:
        alert = self._outgoing.read()
        if alert:
            transport.write(alert)
        if not transport.can_write_eof():
            transport.close()
            return
        self._after_alert = True
        transport.write_eof()
        transport.resume_reading()  # to see the client's EOF (and drop what comes before it)
        self._linger = self._loop.call_later(LINGER, transport.abort)

    def _wakeup_waiter(self, exc: BaseException | None = None) -> None:
        if self._after_alert and exc is not None and self._transport is not None:
            self._held = exc
            return
        super()._wakeup_waiter(exc)

    def buffer_updated(self, nbytes: int) -> None:
        if self._after_alert:
            return  # dropped: the connection is ending
        super().buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        if self._after_alert:
            return None  # the client closed too: the transport closes
        result: bool | None = super().eof_received()
        return result

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._held is not None:
            held, self._held = self._held, None
            super()._wakeup_waiter(held)
        super().connection_lost(exc)

