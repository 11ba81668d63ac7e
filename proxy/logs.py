"""Logging set-up: text or JSON lines, and the session context (protocol, peer, session id,
account) that the daemon's connection guards set and a filter adds to every line."""

from __future__ import annotations

import contextvars
import json
import logging
import secrets
import socket
import struct
import sys
import time
from typing import Any, Literal

LogFormat = Literal["text", "json"]

protocol: contextvars.ContextVar[str | None] = contextvars.ContextVar("protocol", default=None)
peer: contextvars.ContextVar[str | None] = contextvars.ContextVar("peer", default=None)
session: contextvars.ContextVar[str | None] = contextvars.ContextVar("session", default=None)
account: contextvars.ContextVar[str | None] = contextvars.ContextVar("account", default=None)

_FIELDS = (("protocol", protocol), ("peer", peer), ("session", session), ("account", account))


def format_peer(address: Any) -> str | None:
    """``host:port`` (``[v6]:port``) of a socket address, None when there is none."""
    if not isinstance(address, tuple) or len(address) < 2:
        return None
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def begin_session(proto: str, address: Any) -> str:
    """Set the context of the session running in the current task; returns its id."""
    sid = secrets.token_hex(4)
    protocol.set(proto)
    peer.set(format_peer(address))
    session.set(sid)
    account.set(None)
    return sid


class ContextFilter(logging.Filter):
    """Copies the session context onto each record (``record.context`` for the text format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        parts = []
        for name, var in _FIELDS:
            value = var.get()
            setattr(record, name, value)
            if value is not None and name != "account":
                parts.append(value if name != "session" else f"s={value}")
        record.context = f"[{' '.join(parts)}] " if parts else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message and the known context."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage()}
        for name, _ in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(context)s%(message)s"


def setup(level: str, fmt: LogFormat = "text") -> None:
    """Log to standard error at ``level`` in ``fmt``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    debug = level.lower() == "debug"
    # httpx logs every request at INFO: only with debug. httpcore's and aiosmtpd's debug lines
    # are wire traces (aiosmtpd's include AUTH arguments): never.
    logging.getLogger("httpx").setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.INFO)
    logging.getLogger("mail.log").setLevel(logging.INFO)


# Linux struct tcp_info: tcpi_bytes_acked (u64) at 120, tcpi_bytes_received (u64) at 128.
_TCP_INFO_BYTES = struct.Struct("=QQ")
_TCP_INFO_OFFSET = 120


def tcp_counts(transport: Any) -> tuple[int, int] | None:
    """(bytes received from the peer, bytes sent and acknowledged) of a TCP transport, from
    the kernel once at the end of a session, so relaying needs no counting; None if unknown."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None or transport is None:
        return None
    try:
        # A TLS transport that is being torn down has no socket to ask any more.
        sock = transport.get_extra_info("socket")
        if sock is None or sock.fileno() < 0 or sock.family not in (socket.AF_INET,
                                                                    socket.AF_INET6):
            return None
        raw = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 256)
    except (OSError, AttributeError):
        return None
    end = _TCP_INFO_OFFSET + _TCP_INFO_BYTES.size
    if len(raw) < end:
        return None
    acked, received = _TCP_INFO_BYTES.unpack_from(raw, _TCP_INFO_OFFSET)
    return received, acked


def log_session_end(log: logging.Logger, started: float, counts: tuple[int, int] | None) -> None:
    took = time.monotonic() - started
    if counts is None:
        log.info("session ended after %.1f s", took)
    else:
        log.info("session ended after %.1f s: %d bytes from the client, %d to it", took, *counts)
