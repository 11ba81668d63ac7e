"""TLS for one local listener's connections: what its cores offer, and the server-side
handshake the session shells run (at once on an implicit-TLS listener, or after STARTTLS)."""

from __future__ import annotations

import logging
import ssl
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
