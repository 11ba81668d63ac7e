"""The daemon's memory: which allocator ``mailproxy run`` restarts with, and when freed
memory is handed back."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.daemon import memory
from proxy.daemon.memory import (
    MARKER,
    ReleasePolicy,
    allocator_in_use,
    collect_garbage,
    command_of,
    forget_allocator_variable,
    wants_c_allocator,
)
from tests.support.clock import ManualClock as Clock

ROOT = Path(__file__).resolve().parents[2]


def test_restarts_on_linux_with_glibc_unless_told_otherwise() -> None:
    def linux(environ: dict[str, str]) -> bool:
        return wants_c_allocator(environ, platform="linux", ignore_environment=False,
                                 has_malloc_trim=True)

    assert linux({})
    # The user's choice stands, whatever it is (and it is what the restart sets: no loop).
    assert not linux({"PYTHONMALLOC": "pymalloc"})
    assert not linux({"PYTHONMALLOC": "malloc"})
    # -E / -I: the restarted interpreter would ignore the variable and restart again.
    assert not wants_c_allocator({}, platform="linux", ignore_environment=True,
                                 has_malloc_trim=True)
    # No malloc_trim (musl, macOS): the C allocator would not hand pages back either.
    assert not wants_c_allocator({}, platform="linux", ignore_environment=False,
                                 has_malloc_trim=False)
    assert not wants_c_allocator({}, platform="darwin", ignore_environment=False,
                                 has_malloc_trim=True)


@pytest.mark.parametrize(("argv", "command"), [
    (["run"], "run"),
    (["run", "--config", "x.toml"], "run"),
    (["--config", "run", "status"], "status"),  # a config file named "run"
    (["--config", "c.toml", "run"], "run"),
    (["--config=c.toml", "run"], "run"),
    (["--version"], None),
    ([], None),
    (["status", "run"], "status"),
])
def test_command_of(argv: list[str], command: str | None) -> None:
    assert command_of(argv) == command


def test_only_run_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(memory, "use_c_allocator", lambda: calls.append("restart"))
    memory.restart_for_run(["status"])
    memory.restart_for_run(["--config", "c.toml", "tls", "info"])
    assert calls == []
    memory.restart_for_run(["--config", "c.toml", "run"])
    assert calls == ["restart"]


def test_restart_variable_is_not_handed_to_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONMALLOC", "malloc")
    monkeypatch.setenv(MARKER, "1")
    assert allocator_in_use().startswith("the C library's")
    forget_allocator_variable()
    assert "PYTHONMALLOC" not in os.environ and MARKER not in os.environ
    # One the user set is theirs to pass on.
    monkeypatch.setenv("PYTHONMALLOC", "malloc")
    forget_allocator_variable()
    assert os.environ["PYTHONMALLOC"] == "malloc"
    monkeypatch.setenv("PYTHONMALLOC", "pymalloc_debug")
    assert allocator_in_use() == "Python's own (pymalloc_debug)"


def test_release_when_a_crowd_has_left_or_now_and_then() -> None:
    clock = Clock()
    policy = ReleasePolicy(60.0, crowd=50, clock=clock)
    assert not policy.due(ended=0, open_sessions=0)  # nothing ended: nothing to give back
    assert not policy.due(ended=500, open_sessions=12)  # still busy, and not a minute yet
    assert policy.due(ended=500, open_sessions=0)  # a crowd has left: at once
    policy.released(500)
    assert not policy.due(ended=500, open_sessions=0)  # once
    # A health check now and then: not a crowd, so at the steady pace only.
    assert not policy.due(ended=501, open_sessions=0)
    clock.now += 59
    assert not policy.due(ended=510, open_sessions=3)
    clock.now += 1
    assert policy.due(ended=510, open_sessions=3)  # steady churn: once a minute
    policy.released(510)
    assert not policy.due(ended=520, open_sessions=3)


def test_full_collection_only_while_it_is_cheap(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[int] = []

    def collect() -> int:
        runs.append(1)
        return 0

    monkeypatch.setattr(gc, "collect", collect)
    assert collect_garbage(open_sessions=0) and runs == [1]
    assert not collect_garbage(open_sessions=memory.FULL_COLLECTION_SESSIONS) and runs == [1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_hands_free_heap_pages_back() -> None:
    """Freed memory between live blocks stays in the process until ``release`` hands its
    pages back (in a process of its own: a known heap)."""
    code = (
        "from proxy.daemon.memory import release\n"
        "blocks = [bytes(4000) for _ in range(20000)]\n"  # 80 MB in the heap, page by page
        "kept = blocks[::10]\n"  # one in ten stays: glibc cannot shrink the heap's top
        "del blocks\n"
        "before, after = release()\n"
        "print(before, after)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    before, after = map(int, done.stdout.split())
    assert before - after > 40 * 2**20, (before, after)


def test_a_failed_restart_is_said_once_and_closed_streams_do_not_stop_it(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """stdout closed at start (an init script's ``>&-``: ``sys.stdout`` is None) must not stop
    ``run``; an exec that fails leaves Python's allocator, said once although both entry
    points (``launch`` and ``cli.main``) ask."""
    calls: list[list[str]] = []

    def execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        calls.append(argv)
        raise PermissionError("exec refused")

    monkeypatch.setattr(memory, "_tried", False)
    monkeypatch.setattr(memory, "wants_c_allocator", lambda environ: True)
    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.setattr(sys, "stdout", None)
    memory.use_c_allocator(["python", "-m", "proxy", "run"])
    memory.use_c_allocator(["python", "-m", "proxy", "run"])
    assert calls == [["python", "-m", "proxy", "run"]]
    assert caplog.text.count("could not restart with the C library's memory allocator") == 1
