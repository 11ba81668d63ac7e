"""How the daemon gives memory back after sessions end: the C library's allocator, and freed
memory handed back to the system once a crowd of clients has left.

Python's own small-object allocator (pymalloc) takes memory from the system in 1 MiB arenas
and returns an arena only when every object in it is gone. Thousands of sessions fill many
arenas; when they end, the few objects created meanwhile that live on (a cache entry, a log
handler's state, the interpreter's free lists) keep most of those arenas, so the RSS stays
high: 9,000 idle IMAP sessions took the daemon from 73 to 451 MiB and it kept 141 MiB after
they closed (``bench/idle_bench.py --python-allocator``). With ``PYTHONMALLOC=malloc`` small
objects come from glibc's heap instead, whose free pages ``malloc_trim`` hands back one by
one: after the same 9,000 sessions the daemon went back to 99 MiB (74.5 at start), at 46 KB
per held session instead of 44 (64 instead of 57 over TLS).

``PYTHONMALLOC`` is read once, when the interpreter starts, so ``mailproxy run`` restarts
itself once with it (``exec``: same process id, same arguments) unless it is already set: a
user who sets ``PYTHONMALLOC=pymalloc`` keeps Python's own allocator.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("mailproxy")

# Set in the environment of the restarted process only, so that it can tell the variable is
# its own (and drop it before running notification commands) from one the user set.
MARKER = "_MAILPROXY_ALLOCATOR"
# A full collection (which also empties the interpreter's free lists, whose entries would
# keep pages of the heap) is done at a release only while fewer sessions than this are open:
# it pauses the event loop for a time that grows with the objects alive since start-up (those
# of start-up are frozen: ``freeze_startup_objects``): about 2 ms with 1,000 sessions, 70 ms
# with 9,000 on a slow core.
FULL_COLLECTION_SESSIONS = 1000


def wants_c_allocator(environ: Mapping[str, str], *, platform: str = sys.platform,
                      ignore_environment: bool = bool(sys.flags.ignore_environment),
                      has_malloc_trim: bool | None = None) -> bool:
    """Whether ``mailproxy run`` should restart itself with ``PYTHONMALLOC=malloc``: on Linux
    with glibc (which can hand free heap pages back), when the variable is not set yet and
    the interpreter reads its environment (``-E``/``-I`` would ignore it and loop)."""
    if platform != "linux" or ignore_environment or "PYTHONMALLOC" in environ:
        return False
    return (_malloc_trim() is not None) if has_malloc_trim is None else has_malloc_trim


def use_c_allocator(argv: list[str] | None = None) -> None:
    """Restart this process with ``PYTHONMALLOC=malloc`` when ``wants_c_allocator`` says so
    (never returns then). ``argv``: the interpreter's own command line (``sys.orig_argv``)."""
    global _tried
    if _tried or not wants_c_allocator(os.environ):
        return
    _tried = True  # once: a failed exec is said once, not again by ``cli.main``
    argv = list(sys.orig_argv if argv is None else argv)
    environ = {**os.environ, "PYTHONMALLOC": "malloc", MARKER: "1"}
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None when the descriptor was closed at start
            stream.flush()
    try:
        os.execve(sys.executable, argv, environ)  # noqa: S606 (our own interpreter, argv as given)
    except OSError as exc:  # carry on with Python's allocator: a bigger RSS, nothing worse
        log.warning("could not restart with the C library's memory allocator (%s); memory "
                    "freed by ended sessions may not go back to the system", exc)


_tried = False


def command_of(argv: list[str]) -> str | None:
    """The command word of a ``mailproxy`` command line (``--config PATH`` may come first)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--config":
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def restart_for_run(argv: list[str]) -> None:
    """``use_c_allocator`` when the command line runs the daemon."""
    if command_of(argv) == "run":
        use_c_allocator()


def forget_allocator_variable() -> None:
    """Drop the ``PYTHONMALLOC`` this process was restarted with, so commands it runs (a
    notification's) start with the environment it was given."""
    if os.environ.pop(MARKER, None) is not None:
        os.environ.pop("PYTHONMALLOC", None)


def allocator_in_use() -> str:
    """For the start-up log: which allocator serves Python's objects."""
    chosen = os.environ.get("PYTHONMALLOC", "")
    if chosen.startswith("malloc"):
        return "the C library's (freed memory goes back to the system after sessions end)"
    return f"Python's own ({chosen or 'pymalloc'})"


class ReleasePolicy:
    """When to hand freed memory back: when sessions have ended since the last time, and
    either a crowd has left (at least ``crowd`` ended and none is open: at once) or
    ``interval`` seconds have passed (steady churn, a probe now and then: at that pace).
    Fed the running count of ended sessions."""

    def __init__(self, interval: float, crowd: int = 50,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.crowd = crowd
        self.clock = clock
        self._ended = 0
        self._last = clock()

    def due(self, ended: int, open_sessions: int) -> bool:
        if ended == self._ended:
            return False
        if open_sessions == 0 and ended - self._ended >= self.crowd:
            return True
        return self.clock() - self._last >= self.interval

    def released(self, ended: int) -> None:
        self._ended, self._last = ended, self.clock()


def freeze_startup_objects() -> None:
    """Leave the objects of start-up (modules, classes, the configuration: most of what a
    fresh daemon holds) out of every later full collection, which then costs time for the
    sessions' objects only (a full collection of a fresh daemon: 60 ms before, 0 after).
    Called by ``mailproxy run`` before the daemon starts (not by a daemon in a test's
    process, whose objects are the test runner's)."""
    gc.collect()
    gc.freeze()


def release() -> tuple[int, int]:
    """The release itself, in a worker thread: RSS in bytes before and after ``malloc_trim``
    (0, 0 where /proc cannot say)."""
    before = _rss()
    release_free_memory()
    return before, _rss()


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc keeps freed memory in the process,
    so RSS stays at its peak after a crowd of clients leaves). A few milliseconds: call it when
    sessions have ended, not per session. False where there is no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def collect_garbage(open_sessions: int) -> bool:
    """The full collection before a release, when it is cheap enough (see
    ``FULL_COLLECTION_SESSIONS``); True if it ran."""
    if open_sessions >= FULL_COLLECTION_SESSIONS:
        return False
    gc.collect()
    return True
