"""What the upstream login cores share: server bytes split into lines, one verdict per login."""

from __future__ import annotations

from .events import Event, UpstreamFailed

MAX_LINE = 65536


class LineReader:
    """Buffers server bytes and hands complete lines (CRLF removed) to ``_line``.

    Subclasses say with ``_reading()`` whether they expect server data now and with
    ``_finished()`` whether the login is over (no more input is accepted then).
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def receive(self, data: bytes) -> list[Event]:
        if self._finished():
            raise RuntimeError(f"receive() after the login ended ({self._state_name()})")
        self._buf += data
        events: list[Event] = []
        while self._reading():
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_LINE:
                    events.append(self._fail("server sent an over-long line"))
                break
            raw = bytes(self._buf[:end]).removesuffix(b"\r")
            del self._buf[: end + 1]
            events += self._line(raw.decode("utf-8", "replace"))
        return events

    def _reading(self) -> bool:
        raise NotImplementedError

    def _finished(self) -> bool:
        raise NotImplementedError

    def _state_name(self) -> str:
        raise NotImplementedError

    def _line(self, line: str) -> list[Event]:
        raise NotImplementedError

    def _fail(self, reason: str) -> UpstreamFailed:
        raise NotImplementedError
