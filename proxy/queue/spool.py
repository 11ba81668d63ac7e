"""The spool: message files on disk, and the acceptance boundary.

A message is written to ``incoming/`` while it arrives, then ``commit`` makes it durable in
this order: fsync the file, rename it into ``messages/``, fsync that directory, commit its
row to the index. Only after the commit may the client get its 250. A crash before the
commit leaves a temporary file or a file without a row: both are removed at the next start
(the client got no 250 and sends again). At start, deliveries that were in flight go back
to the queue, due at once.

Messages are stored as they came after DATA: dot-stuffed, without the final ``.`` line, so
a delivery sends the file unchanged and adds the end marker. All file I/O runs in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .index import Index, Kind, Record

log = logging.getLogger("mailproxy.queue")

# Bytes gathered in memory before they go to the file in one thread call.
WRITE_BUFFER = 256 * 1024
READ_CHUNK = 256 * 1024
# The headers of a message, for a DSN, are looked for in its first bytes only.
HEADERS_MAX = 256 * 1024
# check_space reads the queue's total and the disk's free space at most this often.
SPACE_TTL = 1.0


class QueueFull(Exception):
    """New messages are refused (``452 4.3.1``): the queue is at ``max_size`` or the disk is
    below the free-space floor. Nothing already queued is affected."""


@dataclass(frozen=True)
class Recovery:
    """What the start-up cleanup found."""

    temporaries: int  # unfinished receptions swept from incoming/
    orphans: int  # message files without an index row (no 250 was given): removed
    missing: int  # index rows whose file is gone: dropped (logged as errors)
    requeued: int  # rows made due now (deliveries in flight, back-off cut short)


def new_id(clock: Callable[[], float] = time.time) -> str:
    """Unique, roughly sortable by time, safe as a file name."""
    return f"{int(clock()):08X}{secrets.token_hex(5).upper()}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_fault(step: str) -> None:
    pass


def _nothing() -> None:
    pass


class Spool:
    """The queue directory: ``incoming/``, ``messages/`` and the index."""

    def __init__(self, directory: Path, index: Index, *, max_size: int = 0,
                 min_free: int = 0, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.incoming = directory / "incoming"
        self.messages = directory / "messages"
        self.index = index
        self.max_size = max_size
        self.min_free = min_free
        self.clock = clock
        # Tests make a step fail here, as a kill at that moment would: "written" (file
        # fsynced), "renamed", "dir_synced", "committed" (row committed, no reply yet).
        self.fault: Callable[[str], None] = _no_fault
        # Called after a message was added to or removed from the index (the queue service
        # refreshes the summary the metrics read).
        self.changed: Callable[[], None] = _nothing
        self._receiving: dict[str, int] = {}  # receptions in progress: bytes so far
        # check_space's readings (see there).
        self._queued: int | None = None
        self._queued_at = 0.0
        self._free = 0
        self._free_at = -SPACE_TTL

    @classmethod
    async def open(cls, directory: Path, *, max_size: int = 0, min_free: int = 0,
                   clock: Callable[[], float] = time.time) -> Spool:
        await asyncio.to_thread(make_dirs, directory)
        index = await Index.open(directory / "index.sqlite")
        return cls(directory, index, max_size=max_size, min_free=min_free, clock=clock)

    async def aclose(self) -> None:
        await self.index.aclose()

    def path(self, message_id: str) -> Path:
        return self.messages / message_id

    # -- start-up -------------------------------------------------------------------------

    async def recover(self) -> Recovery:
        """Sweep what a crash left behind; run once at start, before anything is received."""
        temporaries = await asyncio.to_thread(_sweep, self.incoming, None)
        ids = await self.index.call(self.index.db.ids)
        orphans = await asyncio.to_thread(_sweep, self.messages, ids)
        present = await asyncio.to_thread(lambda: {p.name for p in self.messages.iterdir()})
        missing = 0
        for message_id in sorted(ids - present):
            log.error("queue: message %s has no file in %s (removed by hand?); dropped",
                      message_id, self.messages)
            await self.index.call(self.index.db.remove, message_id)
            missing += 1
        requeued = await self.index.call(self.index.db.restart, self.clock())
        recovery = Recovery(temporaries, orphans, missing, requeued)
        if temporaries or orphans or missing:
            log.info("queue: start-up cleanup: %s", recovery)
        return recovery

    # -- reception ------------------------------------------------------------------------

    async def check_space(self, extra: int = 0) -> None:
        """Raise ``QueueFull`` when one more message (``extra`` bytes so far) is too much.

        The queued total and the free space are read at most every ``SPACE_TTL`` seconds
        (commits made here are counted at once; deletions by the CLI a little later)."""
        now = time.monotonic()
        if self.max_size:
            if self._queued is None or now - self._queued_at > SPACE_TTL:
                self._queued, self._queued_at = await self.index.total_size(), now
            queued = self._queued
            if queued + sum(self._receiving.values()) + extra > self.max_size:
                raise QueueFull(f"the queue is full ({queued} bytes queued, max_size is "
                                f"{self.max_size}); try again later")
        if self.min_free:
            if now - self._free_at > SPACE_TTL:
                self._free = (await asyncio.to_thread(shutil.disk_usage, self.directory)).free
                self._free_at = now
            free = self._free
            if free - extra < self.min_free:
                raise QueueFull(f"the queue's disk has {free} bytes free, below the floor of "
                                f"{self.min_free}; try again later")

    def receive(self, account: str, sender: str, recipients: list[str],
                mail_options: list[str] | None = None, kind: Kind = "message") -> Reception:
        """Start a message; ``sender`` "" or "<>" is the null sender."""
        return Reception(self, account, "" if sender == "<>" else sender, list(recipients),
                         list(mail_options or []), kind)

    async def add(self, account: str, sender: str, recipients: list[str], data: bytes,
                  kind: Kind = "message") -> Record:
        """Queue a whole message at once (a DSN); ``data`` as stored (dot-stuffed)."""
        reception = self.receive(account, sender, recipients, kind=kind)
        try:
            await reception.write(data)
            return await reception.commit(check=False)
        except BaseException:
            await reception.abort()
            raise

    # -- delivery -------------------------------------------------------------------------

    async def open_message(self, message_id: str) -> MessageFile:
        """The stored message, to read in chunks (``FileNotFoundError`` if it is gone)."""
        return MessageFile(await asyncio.to_thread(open, self.path(message_id), "rb"))

    async def headers(self, message_id: str) -> bytes:
        """The message's header section, un-stuffed, ending in CRLF (for a DSN)."""
        return await asyncio.to_thread(_read_headers, self.path(message_id))

    async def discard(self, message_id: str, *, sent: tuple[str, float, int] | None = None
                      ) -> None:
        """Remove a message: its row first (the arbiter), then its file. A crash between the
        two leaves an orphan file, removed at the next start."""
        await self.index.call(lambda: self.index.db.remove(message_id, sent=sent))
        self.changed()
        await asyncio.to_thread(_unlink, self.path(message_id))
        self._queued = None  # read again at the next check


class MessageFile:
    """A stored message open for delivery: iterate for its chunks (read in a thread), then
    ``aclose``."""

    def __init__(self, handle: BinaryIO, chunk: int = READ_CHUNK) -> None:
        self._handle = handle
        self._chunk = chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while data := await asyncio.to_thread(self._handle.read, self._chunk):
            yield data

    async def aclose(self) -> None:
        await asyncio.to_thread(self._handle.close)


class Reception:
    """One message being received: ``write`` its bytes, then ``commit`` or ``abort``."""

    def __init__(self, spool: Spool, account: str, sender: str, recipients: list[str],
                 mail_options: list[str], kind: Kind) -> None:
        self.spool = spool
        self.id = new_id(spool.clock)
        self.account = account
        self.sender = sender
        self.recipients = recipients
        self.mail_options = mail_options
        self.kind: Kind = kind
        self.size = 0
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._fd: int | None = None
        self._temp = spool.incoming / f"{self.id}.tmp"
        spool._receiving[self.id] = 0

    async def write(self, data: bytes) -> None:
        if self.add(data):
            await self.flush()

    def add(self, data: bytes) -> bool:
        """Take ``data`` into memory; True when enough is gathered that ``flush`` should write
        it (a ``data.Sink``'s send/drain: no I/O here)."""
        self.size += len(data)
        if self.id in self.spool._receiving:
            self.spool._receiving[self.id] = self.size  # counts against max_size meanwhile
        self._buffer.append(data)
        self._buffered += len(data)
        return self._buffered >= WRITE_BUFFER

    async def flush(self) -> None:
        """Write what ``add`` gathered to the temporary file (in a thread)."""
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        if self._fd is None:
            self._fd = await asyncio.to_thread(
                os.open, self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        await asyncio.to_thread(_write_all, self._fd, data)

    async def commit(self, *, check: bool = True, size: int | None = None) -> Record:
        """Make the message durable and queued; only then may the client get 250.

        ``size``: keep only that many bytes (what came after is the end marker, which the
        front's pump writes into its sink too). Raises ``QueueFull`` (``check``: the size
        budget and the disk floor) and ``OSError``; the temporary file is removed then, and
        nothing is queued.
        """
        spool = self.spool
        if size is not None and not 0 <= size <= self.size:
            raise ValueError(f"cannot keep {size} bytes of {self.size}")
        try:
            if check:
                spool._receiving.pop(self.id, None)
                await spool.check_space(self.size)
            data = b"".join(self._buffer)
            self._buffer, self._buffered = [], 0
            fd, self._fd = self._fd, None
            keep = size if size is not None and size != self.size else None
            if keep is not None:
                self.size = keep
            target = spool.path(self.id)
            # One thread hop for the whole boundary: it is what the client waits for.
            await asyncio.to_thread(self._persist, fd, data, keep, target)
            now = spool.clock()
            record = Record(id=self.id, account=self.account, sender=self.sender,
                            recipients=self.recipients, size=self.size, received=now,
                            next_attempt=now, mail_options=self.mail_options, kind=self.kind)
            try:
                await spool.index.insert(record)
            except Exception:
                await asyncio.to_thread(_unlink, target)
                raise
            if spool._queued is not None:
                spool._queued += record.size
            spool._free -= record.size
            spool.changed()
            spool.fault("committed")
            return record
        except Exception:
            await self.abort()
            raise
        finally:
            spool._receiving.pop(self.id, None)

    def _persist(self, fd: int | None, data: bytes, keep: int | None, target: Path) -> None:
        """In a thread: the rest written, the file fsynced, renamed into the queue, the
        directory fsynced."""
        spool = self.spool
        if fd is None:  # everything was still in memory
            fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if data:
                _write_all(fd, data)
            if keep is not None:
                os.ftruncate(fd, keep)
            os.fsync(fd)
        finally:
            os.close(fd)
        spool.fault("written")
        os.rename(self._temp, target)
        spool.fault("renamed")
        fsync_dir(spool.messages)
        spool.fault("dir_synced")

    async def abort(self) -> None:
        """Drop the message (the client went away, or it is refused)."""
        self.spool._receiving.pop(self.id, None)
        self._buffer, self._buffered = [], 0
        fd, self._fd = self._fd, None
        await asyncio.to_thread(_close_unlink, fd, self._temp)


def make_dirs(directory: Path) -> None:
    for path in (directory, directory / "incoming", directory / "messages"):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _close_unlink(fd: int | None, path: Path) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
    _unlink(path)


def _sweep(directory: Path, keep: set[str] | None) -> int:
    """Remove the files in ``directory`` whose names are not in ``keep`` (None: all)."""
    removed = 0
    for path in directory.iterdir():
        if keep is not None and path.name in keep:
            continue
        _unlink(path)
        removed += 1
    return removed


def _read_headers(path: Path) -> bytes:
    with open(path, "rb") as handle:
        head = handle.read(HEADERS_MAX)
    end = head.find(b"\r\n\r\n")
    if head.startswith(b"\r\n"):
        head = b""
    elif end >= 0:
        head = head[:end + 2]
    else:  # no body, or headers longer than we look: up to the last whole line
        cut = head.rfind(b"\r\n")
        head = head[:cut + 2] if cut >= 0 else b""
    # Un-stuff: a line starting with "." came with one more.
    lines = head.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
