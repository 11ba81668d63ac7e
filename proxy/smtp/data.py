"""The message after DATA, streamed: the front reads the client's bytes with ``pump`` and
they go to a ``Sink`` (the upstream, later the queue's spool) as they arrive.

The client's bytes are already dot-stuffed and end with ``CRLF . CRLF``, which is exactly what
the upstream wants, so nothing is un-stuffed, re-stuffed or split into lines: ``EndOfData``
only looks for the end marker, across chunk boundaries, and ``pump`` forwards whole chunks.

Except for line ends: a bare LF or a lone CR is never forwarded (RFC 5321 2.3.8). Servers
differ on what they end a line (and so a message) at: Postfix also ends a message at
``LF . LF``, and what a client sent after it would run upstream as commands the proxy never saw
(SMTP smuggling, CVE-2023-51764). ``Message`` turns every bare LF and lone CR into CRLF before
looking for the end, as Postfix's ``smtpd_forbid_bare_newline = normalize`` does, so the proxy
and the upstream see the same message end. Chunks with proper line ends only (nearly all) are
checked with three ``count`` calls and forwarded as they are.
"""

from __future__ import annotations

import asyncio
import enum
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

END_MARK = b"\r\n.\r\n"
_LINE_END = re.compile(rb"\r\n|\r|\n")
# Large reads keep the per-byte work in C (find, TLS, the socket calls). Measured with 1 MB
# messages: 64 KiB took 30% less CPU than 256 KiB (fresh 256 KiB buffers go through mmap and
# page faults, and fall out of the cache); 16-32 KiB cost more Python per byte.
CHUNK = 64 * 1024


class EndOfData:
    """Finds the end of the message (the line holding only ".") in chunks of any size.

    Up to 4 bytes of what came before are kept, so a marker split over chunks (down to one
    byte each) is found. The CRLF that ended the DATA command counts as the start: a message
    whose first line is "." is empty.
    """

    def __init__(self) -> None:
        self._tail = b"\r\n"

    def feed(self, chunk: bytes) -> int:
        """The index in ``chunk`` just after the end marker, or -1 if it is not complete yet."""
        tail = self._tail
        # A marker that starts in the tail ends within the first 4 bytes of the chunk.
        at = (tail + chunk[:4]).find(END_MARK)
        if at >= 0:
            return at + len(END_MARK) - len(tail)
        # A dot is rare in bulk data (base64 has none) and memchr finds one at memory speed,
        # ~50 times faster than searching the 5-byte marker (~2 GB/s here).
        at = chunk.find(END_MARK) if b"." in chunk else -1
        if at >= 0:
            return at + len(END_MARK)
        self._tail = chunk[-4:] if len(chunk) >= 4 else (tail + chunk)[-4:]
        return -1


class Message:
    """The client's message as it is forwarded: every line end made CRLF, and its end found.

    A CR at the end of a chunk is held back until the next byte says whether it is a CRLF.
    """

    def __init__(self) -> None:
        self._scanner = EndOfData()
        self._held = b""

    def feed(self, chunk: bytes) -> tuple[bytes, int]:
        """(the bytes to forward, the index in ``chunk`` just after the end marker or -1)."""
        held = len(self._held)
        data, self._held = self._held + chunk, b""
        crlf = data.count(b"\r\n")
        if data.count(b"\n") == crlf and data.count(b"\r") == crlf:
            end = self._scanner.feed(data)
            return (data, -1) if end < 0 else (data[:end], end - held)
        if data.endswith(b"\r"):
            data, self._held = data[:-1], b"\r"
        normal = _LINE_END.sub(b"\r\n", data)
        end = self._scanner.feed(normal)
        if end < 0:
            return normal, -1
        self._held = b""  # it belongs to what follows the message
        return normal[:end], self._raw_index(data, end) - held

    @staticmethod
    def _raw_index(data: bytes, normal_end: int) -> int:
        """The index in ``data`` of the line end that ends at ``normal_end`` once normalized."""
        added = 0
        for match in _LINE_END.finditer(data):
            added += 2 - (match.end() - match.start())
            if match.end() + added == normal_end:
                return match.end()
        raise AssertionError("the end marker ends with a line end")


class SinkGone(Exception):
    """The sink cannot take the rest of the message (connection lost, disk full), and what
    it took is not confirmed. ``upstream.UpstreamGone`` is one."""


class Sink(Protocol):
    """Where the message goes (``SmtpUpstreamSession``, or a queue's spool file); ``send``
    and ``drain`` raise ``SinkGone`` when it breaks. Called once per chunk: keep them thin."""

    def send(self, data: bytes) -> bool:
        """Write ``data``; True when the writer is congested and ``drain`` must be awaited."""

    async def drain(self) -> None: ...


class Outcome(enum.Enum):
    SENT = "sent"  # the whole message, end marker included, went into the sink
    TOO_BIG = "too big"  # over the size limit: the rest was read and thrown away
    UPSTREAM_LOST = "upstream lost"  # the sink broke (SinkGone): the rest was read and dropped
    REFUSED = "refused"  # the go-ahead said no: nothing was sent, the rest thrown away
    CLIENT_GONE = "client gone"  # EOF before the end marker


@dataclass
class Result:
    outcome: Outcome
    size: int  # the message as the client sent it (dot-stuffed), without the final ".\r\n"
    error: str = ""  # why the sink was lost (its SinkGone)


def unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Give back bytes read past the end marker: the client's next command(s).

    The only write into a library object's private state in proxy/smtp: StreamReader has no
    public way to push back (``feed_data`` appends, behind bytes still buffered), and
    aiosmtpd itself reaches into ``_buffer`` (it clears it after STARTTLS). Reading no further
    than the marker instead would mean small reads or a search of the whole buffer per read.
    """
    reader._buffer[0:0] = data  # type: ignore[attr-defined]


async def pump(reader: asyncio.StreamReader, sink: Sink, limit: int | None,
               on_progress: Callable[[], None],
               go_ahead: Callable[[], Awaitable[bool]] | None = None) -> Result:
    """Read the client's message up to its end marker and write it to ``sink`` with CRLF
    line ends (see ``Message``; unchanged when it has them already).

    Past ``limit`` (or when the sink breaks: ``SinkGone``, also from ``go_ahead``) nothing
    more is written, and in particular never the end marker, but the client is still read to
    the end of its message so that the reply reaches a client that is listening again.
    ``on_progress`` runs for every chunk (the idle timer: a large upload is not idleness).
    ``go_ahead``, if given, is awaited before the first byte is written (the sink's 354):
    False means the sink refused the message.
    """
    message = Message()
    total = 0
    outcome = Outcome.SENT
    error = ""
    # Over the limit means: total minus the final ".\r\n" exceeds it.
    budget = None if not limit else limit + 3
    while True:
        chunk = await reader.read(CHUNK)
        if not chunk:
            return Result(Outcome.CLIENT_GONE, max(total - 3, 0))
        on_progress()
        raw = chunk
        chunk, end = message.feed(raw)
        if 0 <= end < len(raw):
            unread(reader, raw[end:])
        total += len(chunk)
        if outcome is Outcome.SENT:
            if budget is not None and total > budget:
                # Checked before writing: the chunk holding the end marker of a message that
                # is too big must never reach the upstream.
                outcome = Outcome.TOO_BIG
            else:
                try:
                    if go_ahead is not None:
                        ready, go_ahead = go_ahead, None
                        if not await ready():
                            outcome = Outcome.REFUSED
                    if outcome is Outcome.SENT and sink.send(chunk):
                        await sink.drain()
                except SinkGone as exc:
                    outcome, error = Outcome.UPSTREAM_LOST, str(exc)
        if end >= 0:
            return Result(outcome, total - 3, error)
