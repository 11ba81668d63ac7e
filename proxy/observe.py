"""What the daemon's parts report at the edges (a login's verdict, a session's end, a token
request's result, a message's fate) for metrics; the default ``Observer`` ignores it all."""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Any

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received, u64 at 120 and 128.
_TCP_INFO_BYTES = struct.Struct("=QQ")
_TCP_INFO_BYTES_AT = 120


class Observer:
    """Told what happened; does nothing here. ``proxy.daemon.metrics.Metrics`` counts it."""

    def login(self, proto: str, result: str, seconds: float) -> None:
        """A client login's verdict: ``ok`` or the refusal's kind."""

    def upstream_auth(self, proto: str, mechanism: str, result: str) -> None:
        """An upstream SASL exchange: ``ok``, ``rejected`` or ``temporary``."""

    def session_ended(self, proto: str, received: int, sent: int) -> None:
        """A client connection closed; bytes received from and sent to the client."""

    def token_request(self, account: str, grant: str, result: str) -> None:
        """A request to a token endpoint: ``ok``, ``transient`` or ``permanent``."""

    def smtp_message(self, result: str) -> None:
        """A message's final reply: ``accepted``, ``rejected`` or ``failed``."""


def tcp_byte_counts(transport: Any) -> tuple[int, int] | None:
    """(bytes received, bytes sent and acknowledged) on a TCP transport, from the kernel's
    counters (Linux): counting them at the end costs nothing per chunk."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    with contextlib.suppress(OSError, AttributeError):
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        if len(info) >= _TCP_INFO_BYTES_AT + _TCP_INFO_BYTES.size:
            acked, received = _TCP_INFO_BYTES.unpack_from(info, _TCP_INFO_BYTES_AT)
            return int(received), int(acked)
    return None
