"""The thin asyncio shell around a connection: await bytes before login, splice after it.

One ``Conn`` protocol serves both phases, so no byte read before the switch is lost: before the
splice ``recv()`` hands out what arrived; ``splice()`` returns what is still buffered and from
then on ``data_received`` writes straight into the peer's transport, with flow control in both
directions and no per-chunk work beyond that.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
import ssl
from pathlib import Path
from typing import cast

from .logs import tcp_counts

# Before the splice, stop reading from a client that sends faster than we consume, or that
# does not read its replies (replies can be many times the size of the commands that caused
# them): both buffers stay small, and recv() hands out small pieces.
_PRELOGIN_HIGH_WATER = 64 * 1024
_PRELOGIN_WRITE_HIGH_WATER = 64 * 1024
_RECV_MAX = 16 * 1024
_WRITE_HIGH_WATER = 1024 * 1024
# How long a connection closed before the splice waits for the client to close its side.
LINGER = 2.0
# What the process runs out of, not the network or the peer: file descriptors, socket memory.
RESOURCE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


def out_of_resources(exc: BaseException) -> bool:
    """Whether ``exc`` says this process (or the system) is short of descriptors or memory."""
    return isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS


log = logging.getLogger("mailproxy.net")


class Conn(asyncio.Protocol):
    def __init__(self, *, tls_first: bool = False) -> None:
        """``tls_first``: an implicit-TLS listener's connection; nothing is read until
        ``accept_tls`` (the ClientHello must reach the TLS layer, not our buffer)."""
        self._tls_first = tls_first
        self.transport: asyncio.Transport | None = None
        self.peer: Conn | None = None
        loop = asyncio.get_running_loop()
        self.connected: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._buf = bytearray()
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused_reading = False
        self._paused_writing = False
        self.counts: tuple[int, int] | None = None  # bytes (from, to) the peer, once closed
        self._lingering = False
        self._linger: asyncio.TimerHandle | None = None
        # Seconds our send buffer may stay over its high-water mark before the connection is
        # aborted (a peer that stopped reading); None: wait for ever.
        self.stall_timeout: float | None = None
        self._stall: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's are not subclasses of asyncio.Transport.
        self.transport = stream = cast(asyncio.Transport, transport)
        stream.set_write_buffer_limits(high=_PRELOGIN_WRITE_HIGH_WATER)
        sock = stream.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls_first:
            stream.pause_reading()  # accept_tls resumes it under TLS
        if not self.connected.done():
            self.connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:
            if peer.transport is not None:
                peer.transport.write(data)
            return
        if self._lingering:
            return  # read to the client's EOF and dropped: see close()
        self._buf += data
        self._flow()
        self._wake()

    def _flow(self) -> None:
        """Before the splice: read only while both buffers are below their marks."""
        if self.transport is None or self.peer is not None:
            return
        pause = len(self._buf) > _PRELOGIN_HIGH_WATER or self._paused_writing
        if pause and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()
        elif not pause and self._paused_reading and not self._lingering:
            self._paused_reading = False
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        if self.peer is not None and self.peer.transport is not None:
            # Mail protocols do not half-close: one side done means the session is done.
            self.peer.transport.close()
        return None  # close our transport too

    def connection_lost(self, exc: Exception | None) -> None:
        # Once per connection (the socket is still open here): for the session's end line.
        self.counts = tcp_counts(self.transport)
        if self._linger is not None:
            self._linger.cancel()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._eof = True
        self._wake()
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        # The two sides of a splice refer to each other: let each go with its own session
        # instead of waiting, with both transports and sockets, for the cyclic collector.
        self.peer = None
        release_transport(self.transport)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        # Our transport's send buffer is full: stop reading what fills it.
        self._paused_writing = True
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()
        self._flow()
        if self.stall_timeout is not None and self._stall is None:
            self._stall = asyncio.get_running_loop().call_later(self.stall_timeout,
                                                                self._stalled)


    def _stalled(self) -> None:
        self._stall = None
        if self._paused_writing and self.transport is not None:
            log.info("%s read nothing of what was sent to it for %.0f s; connection cut",
                     peer_name(self), self.stall_timeout or 0)
            self.transport.abort()

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()
        self._flow()
        self._wake()

    # -- before the splice -----------------------------------------------------------------

    async def recv(self) -> bytes:
        """What is buffered (up to 16 KiB), waiting for some if there is none and while the
        client leaves its replies unread; b"" at EOF."""
        while (not self._buf or self._paused_writing) and not self._eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buf[:_RECV_MAX])
        del self._buf[:_RECV_MAX]
        self._flow()
        return data

    @property
    def quiet(self) -> bool:
        """Open, not spliced, and nothing arrived that was not read: what a logged-in upstream
        session kept for a later client must still be (a server's BYE or close is not)."""
        transport = self.transport
        return (transport is not None and not transport.is_closing() and not self._eof
                and not self._buf and self.peer is None)

    def discard_buffered(self) -> int:
        """Drop what arrived but was not read yet; returns how many bytes."""
        dropped = len(self._buf)
        self._buf = bytearray()
        return dropped

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        """Close; before the splice without losing the last reply: a close with unread input
        makes the kernel send a reset, and the client may lose what it had not read yet. So
        send what is written, then a FIN, and read (dropping it) what the client still sends
        until it closes too, for up to LINGER seconds."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._lingering:
            return
        if self.peer is not None or self._eof or not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        self._buf.clear()
        transport.write_eof()
        if self._paused_reading:
            self._paused_reading = False
            transport.resume_reading()
        # abort(): a client that reads nothing would keep close() waiting for the buffer.
        self._linger = asyncio.get_running_loop().call_later(LINGER, transport.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def release_transport(transport: asyncio.BaseTransport | None) -> None:
    """Call from ``connection_lost``: asyncio's selector socket transport refers to itself
    through its read callback (a bound method), so once closed it, its socket and whatever
    it still holds wait for the cyclic garbage collector, and meanwhile the next sessions
    allocate new memory around them (RSS that is not given back after a crowd leaves). At
    ``connection_lost`` nothing reads any more; without the callback, reference counting
    frees the transport. (Other transports have no such attribute: nothing happens.)"""
    if getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None  # type: ignore[union-attr]


def peer_name(conn: Conn | asyncio.BaseTransport | None) -> str:
    """The remote address of a connection, for logs ("127.0.0.2:40112"; "unknown")."""
    transport = conn.transport if isinstance(conn, Conn) else conn
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer) if peer else "unknown"


def peer_host(conn: Conn | asyncio.BaseTransport | None) -> str:
    """The remote IP address of a connection (the key of per-address limits)."""
    transport = conn.transport if isinstance(conn, Conn) else conn
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unknown"


async def splice(a: Conn, b: Conn, a_pending: bytes = b"", b_pending: bytes = b"") -> None:
    """Relay between ``a`` and ``b`` until both are closed.

    ``a_pending`` goes to ``a`` first (bytes ``b`` sent earlier), likewise ``b_pending``, then
    whatever each side still had buffered unread.
    """
    assert a.transport is not None and b.transport is not None
    for side in (a, b):
        side.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)  # type: ignore[union-attr]
    for dst, src, pending in ((a, b, a_pending), (b, a, b_pending)):
        leftover, src._buf = bytes(src._buf), bytearray()
        if pending or leftover:
            dst.write(pending + leftover)
        if src._paused_reading:
            src._paused_reading = False
            src.transport.resume_reading()  # type: ignore[union-attr]
        src.peer = dst
        if src._eof or src.transport.is_closing():  # type: ignore[union-attr]
            dst.close()
    # A side whose send buffer was already full must hold its peer back from the start.
    for side in (a, b):
        if side._paused_writing and side.peer is not None and side.peer.transport is not None:
            side.peer.transport.pause_reading()
    try:
        await asyncio.gather(asyncio.shield(a.closed), asyncio.shield(b.closed))
    finally:
        a.close()
        b.close()


@functools.lru_cache(maxsize=64)
def client_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verification always on; ``ca_file`` adds trust anchors to the system's.

    Cached: loading the system CA bundle costs ~20 ms, which a login must not pay. A changed
    CA file takes effect at the next start.
    """
    context = ssl.create_default_context()
    default = ssl.get_default_verify_paths().cafile
    if default and not context.cert_store_stats()["x509_ca"]:
        # create_default_context() loads nothing, and says nothing, when it cannot open the
        # system's CA file (out of file descriptors): load it again, to fail loudly instead of
        # caching a context that trusts nothing.
        context.load_verify_locations(cafile=default)
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


# TCP keepalive on upstream connections: a probe after this long idle, then every
# KEEPALIVE_INTERVAL, KEEPALIVE_COUNT unanswered ones end the connection (about 2 minutes);
# data (or a probe) the server has not acknowledged for USER_TIMEOUT seconds ends it too
# (Linux), rather than the kernel's retransmissions for about 15 minutes.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 15
KEEPALIVE_COUNT = 4
USER_TIMEOUT = 60


def keep_alive(sock: socket.socket) -> None:
    """Probe an idle connection now and then: a NAT or firewall on the way (some drop idle
    TCP after 4 minutes) keeps its mapping, and a path that died without a reset is noticed
    and closed, rather than found dead by the next client (a spare session, an IDLE), whose
    first command then fails within a minute rather than hanging for fifteen."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE),
                            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
                            ("TCP_USER_TIMEOUT", USER_TIMEOUT * 1000)):
            option = getattr(socket, name, None)  # not every platform has them all
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError as exc:  # a socket that is not TCP (tests) or already closed
        log.debug("TCP keepalive not set: %s", exc)


async def open_connection(host: str, port: int, tls: ssl.SSLContext | None,
                          timeout: float) -> Conn:
    """A connection to an upstream server (TCP keepalive on: ``keep_alive``)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        transport, conn = await loop.create_connection(
            Conn, host, port, ssl=tls, server_hostname=host if tls else None,
            ssl_handshake_timeout=timeout if tls else None)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        keep_alive(sock)
    return conn


async def start_tls(conn: Conn, context: ssl.SSLContext, host: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    assert conn.transport is not None
    transport = await loop.start_tls(conn.transport, conn, context, server_hostname=host,
                                     ssl_handshake_timeout=timeout)
    if transport is None:
        raise ConnectionError("connection closed during the TLS handshake")
    conn.transport = transport


async def accept_tls(conn: Conn, context: ssl.SSLContext, timeout: float, *,
                     reply: bytes = b"") -> int:
    """The server side of a TLS handshake on ``conn``: at once on an implicit-TLS listener
    (a ``Conn(tls_first=True)``), or after STARTTLS/STLS with ``reply`` its go-ahead.

    Reading stops first, then whatever the client sent in the clear and was not read yet is
    dropped, and only then goes ``reply`` out: a client that waits for the go-ahead has sent
    nothing that is dropped, and what a client sent without waiting is never taken as a
    command under TLS (the STARTTLS injection class; bytes still in the socket reach the TLS
    layer and fail the handshake). Returns how many bytes were dropped. Raises
    ``ssl.SSLError``, ``OSError`` or ``TimeoutError`` when the handshake fails.
    """
    loop = asyncio.get_running_loop()
    transport = conn.transport
    assert transport is not None
    # No await from here to start_tls, which installs TLS before reading resumes.
    transport.pause_reading()
    conn._paused_reading = False  # the pre-login back-pressure pause is subsumed by this one
    dropped = conn.discard_buffered()
    if reply:
        transport.write(reply)
    tls = await loop.start_tls(transport, conn, context, server_side=True,
                               ssl_handshake_timeout=timeout)
    if tls is None:
        raise ConnectionError("connection closed during the TLS handshake")
    tls.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
    conn.transport = tls
    return dropped


def describe_error(exc: BaseException) -> str:
    """A sentence for a person: why a connection failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc.reason or exc})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"host name not found ({exc.strerror})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
