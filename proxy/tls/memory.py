"""Process settings for many idle sessions: one shared TLS read buffer, the open-file limit
(giving freed memory back is ``daemon.memory``'s).

asyncio's ``SSLProtocol`` gives every TLS connection its own 256 KiB receive buffer, zeroed (so
resident) at once: 256 KiB of RSS per TLS leg whether the session moves a byte or not. That
buffer only carries bytes from ``recv_into`` to the connection's own ``MemoryBIO``: on the
selector event loop the transport calls ``get_buffer``, ``recv_into`` and ``buffer_updated`` in
one callback, and ``buffer_updated`` copies the bytes into the BIO before it does anything else.
So one buffer per thread serves every connection of that thread's loop, at the same size, and
bulk transfers still take up to 256 KiB from the socket per wake-up. (The proactor loop on
Windows keeps a buffer in the kernel across callbacks; there nothing is changed.)

The same class attribute also sizes each decrypted read (``SSLObject.read(max_size)``), which
allocates that much per TLS record and shrinks it: 16 KiB, the largest record TLS allows, keeps
one record per read as before and spares the allocator a 256 KiB block per record.
"""

from __future__ import annotations

import asyncio.sslproto
import logging
import resource
import sys
import threading
from typing import Any

from ..net import release_transport
from .refusal import AlertingSSLProtocol

log = logging.getLogger("mailproxy")

_Base: Any = asyncio.sslproto.SSLProtocol
READ_BUFFER = 256 * 1024  # asyncio's own size, shared per thread
TLS_RECORD = 16 * 1024  # largest plaintext in one TLS record
_per_thread = threading.local()


def _shared_buffer() -> bytearray:
    buffer: bytearray | None = getattr(_per_thread, "buffer", None)
    if buffer is None:
        buffer = _per_thread.buffer = bytearray(READ_BUFFER)
    return buffer


class SharedBufferSSLProtocol(AlertingSSLProtocol):
    """``SSLProtocol`` receiving into its thread's buffer instead of one of its own (and
    ending a failed handshake with its alert: ``refusal``)."""

    # Sizes the base class's own buffer (dropped below) and each decrypted read; the socket
    # read takes the whole shared buffer (get_buffer hands out all of it, as before).
    max_size = TLS_RECORD

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ssl_buffer = _shared_buffer()
        self._ssl_buffer_view = memoryview(self._ssl_buffer)

    def connection_lost(self, exc: BaseException | None) -> None:
        release_transport(self._transport)  # the TCP transport under TLS (net.py says why)
        super().connection_lost(exc)


def _compatible() -> bool:
    """Whether asyncio's SSLProtocol still works the way this relies on."""
    return (sys.platform != "win32"
            and all(callable(getattr(_Base, name, None))
                    for name in ("get_buffer", "buffer_updated"))
            and isinstance(getattr(_Base, "max_size", None), int))


def share_tls_read_buffer() -> bool:
    """Make every asyncio TLS connection created from now on (listeners, ``start_tls``,
    upstream legs, the HTTP client) use its thread's shared read buffer, and send the alert
    of a handshake that fails (``refusal.AlertingSSLProtocol``). Idempotent; False
    when this Python's asyncio is not the one this was written for (then nothing changes)."""
    if asyncio.sslproto.SSLProtocol is SharedBufferSSLProtocol:
        return True
    if not _compatible():
        log.info("asyncio's TLS protocol is not the expected one: each TLS connection keeps "
                 "its own 256 KiB read buffer")
        return False
    setattr(asyncio.sslproto, "SSLProtocol", SharedBufferSSLProtocol)  # noqa: B010 (mypy)
    return True


def unshare_tls_read_buffer() -> None:
    """Back to asyncio's own protocol (tests)."""
    setattr(asyncio.sslproto, "SSLProtocol", _Base)  # noqa: B010 (mypy)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit, so thousands of
    sessions (two descriptors each) are not refused at a default of 1,024. Returns (before,
    after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft, soft
    if hard == resource.RLIM_INFINITY:
        # macOS reports no hard limit but refuses more than its kernel maximum.
        candidates = [1 << 20, 1 << 16, 10240]
    else:
        candidates = [hard]
    for target in candidates:
        if target <= soft:
            return soft, soft
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        return soft, target
    return soft, soft
