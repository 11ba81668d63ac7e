"""TLS for one local listener's connections: what its cores offer, and the server-side
handshake the session shells run (at once on an implicit-TLS listener, or after STARTTLS).

Every handshake takes the context current at that moment (the certificate on disk now, the
``tls_min_version`` of the configuration now): a listener holds no context of its own, so a
reload or a renewed certificate reaches the next connection.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from ..config import TlsVersion
from ..core.tlsoffer import TlsOffer
from ..net import Conn, accept_tls, describe_error
from .contexts import ServerTls

log = logging.getLogger("mailproxy.tls")

HANDSHAKE_TIMEOUT = 30.0


@dataclass(frozen=True)
class ClientTls:
    server: ServerTls
    min_version: TlsVersion
    implicit: bool  # the implicit-TLS listener: the handshake comes first
    required: bool  # passwords only under TLS (on a plain listener: STARTTLS first)
    timeout: float = HANDSHAKE_TIMEOUT

    def offer(self) -> TlsOffer:
        """What a new connection's core starts with."""
        return TlsOffer(available=True, required=self.required, active=self.implicit)

    async def handshake(self, conn: Conn, proto: str, *, reply: bytes = b"",
                        dropped: int = 0) -> bool:
        """Do the server side of the handshake on ``conn`` (``reply``: the STARTTLS go-ahead;
        ``dropped``: bytes the core already discarded). False when it failed (logged)."""
        peer = _peer(conn)
        try:
            context = await self.server.context(self.min_version)
            dropped += await accept_tls(conn, context, self.timeout, reply=reply)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            log.info("%s: TLS handshake with %s failed: %s", proto, peer, describe_error(exc))
            return False
        if dropped:
            log.warning("%s: %s sent %d bytes after STARTTLS without waiting for the answer; "
                        "dropped unread (a client bug, or a command injection attempt)",
                        proto, peer, dropped)
        return True


def _peer(conn: Conn) -> str:
    if conn.transport is None:
        return "a client"
    peer = conn.transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "a client"


class _Pending(asyncio.Protocol):
    """The application side of an implicit-TLS connection during its handshake: keeps what
    arrives before the real protocol takes over (``accept_implicit``), then passes it on."""

    def __init__(self) -> None:
        self.target: asyncio.Protocol | None = None
        self.data = bytearray()
        self.eof = False
        self.lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        if self.target is not None:
            self.target.data_received(data)
        else:
            self.data += data

    def eof_received(self) -> bool | None:
        if self.target is not None:
            return self.target.eof_received()
        self.eof = True
        return True  # the real protocol decides

    def connection_lost(self, exc: Exception | None) -> None:
        if self.target is not None:
            self.target.connection_lost(exc)
        else:
            self.lost = (exc,)

    def pause_writing(self) -> None:
        if self.target is not None:
            self.target.pause_writing()

    def resume_writing(self) -> None:
        if self.target is not None:
            self.target.resume_writing()


async def accept_implicit(transport: asyncio.Transport, context: ssl.SSLContext,
                          timeout: float, make: Callable[[], asyncio.Protocol]
                          ) -> asyncio.Protocol:
    """The server side of the handshake on a connection accepted in the clear (its reading
    paused since ``connection_made``, so the ClientHello waits in the socket), then ``make()``
    gets the TLS transport, as if the listener had been created with ``ssl=context``. Raises
    ``ssl.SSLError``, ``OSError`` or ``TimeoutError`` when the handshake fails (the
    connection is closed then, after the TLS alert when there is one)."""
    loop = asyncio.get_running_loop()
    pending = _Pending()
    tls = await loop.start_tls(transport, pending, context, server_side=True,
                               ssl_handshake_timeout=timeout)
    if tls is None:
        raise ConnectionError("connection closed during the TLS handshake")
    protocol = make()
    tls.set_protocol(protocol)
    pending.target = protocol
    protocol.connection_made(tls)
    if pending.data:
        protocol.data_received(bytes(pending.data))
    if pending.eof and not protocol.eof_received():
        tls.close()
    if pending.lost is not None:
        protocol.connection_lost(pending.lost[0])
    return protocol
