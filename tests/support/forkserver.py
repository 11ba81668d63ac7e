"""Start ``mailproxy run`` many times without paying its imports each time: a process that has
imported the daemon once forks a fresh daemon on request (``python -m tests.support.forkserver``,
driven by ``ForkServer``).

A test that kills the daemon fifty times (test_queue_crash) spent most of each round on the
~1.5 s of imports of a new interpreter on a busy machine. Each child here is the real daemon
from ``proxy.cli.main(["run", ...])`` on, in a process of its own with its own environment,
working directory and log; only the module imports were done before the fork. The parent
never starts an event loop or a thread, so forking it is safe.

Protocol: one JSON object a line on stdin, one answer a line on stdout:
``{"spawn": [argv...], "env": {...}, "cwd": "...", "log": "path"}`` -> ``{"pid": N}``;
``{"wait": N}`` -> ``{"status": code}`` (a signal -N); ``{"poll": N}`` -> ``{"status": code
or null}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import traceback
from pathlib import Path
from typing import Any

# What `mailproxy run` imports, at once or on its way to listening.
PRELOAD = ("proxy.cli", "proxy.cli.run", "proxy.daemon.server", "proxy.sessions.imap",
           "proxy.sessions.pop3", "proxy.smtp.service", "proxy.queue.service",
           "proxy.queue.deliver", "proxy.queue.transaction")


def _child(request: dict[str, Any]) -> None:
    """In the forked child: become the daemon; never returns."""
    code = 1
    try:
        random.seed()  # not the parent's sequence
        null = os.open(os.devnull, os.O_RDWR)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        from proxy.cli import main

        code = main(request["spawn"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def _status(raw: int) -> int:
    return -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)


def serve() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    out = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        if "spawn" in request:
            out.flush()
            pid = os.fork()
            if pid == 0:
                _child(request)
            answer: dict[str, Any] = {"pid": pid}
        elif "wait" in request:
            answer = {"status": _status(os.waitpid(request["wait"], 0)[1])}
        else:
            pid, raw = os.waitpid(request["poll"], os.WNOHANG)
            answer = {"status": _status(raw) if pid else None}
        out.write(json.dumps(answer) + "\n")
        out.flush()


class ForkServer:
    """The test's side: ``spawn`` a daemon, ``poll``/``wait`` for its end (it is the fork
    server's child, so only that process can reap it); ``os.kill`` it by pid."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, cwd: Path) -> ForkServer:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.forkserver", cwd=cwd,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return cls(proc)

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        async with self._lock:
            self._proc.stdin.write(json.dumps(request).encode() + b"\n")
            await self._proc.stdin.drain()
            line = await self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork server exited")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def spawn(self, argv: list[str], *, env: dict[str, str], cwd: Path,
                    log: Path) -> int:
        answer = await self._ask({"spawn": argv, "env": env, "cwd": str(cwd),
                                  "log": str(log)})
        return int(answer["pid"])

    async def poll(self, pid: int) -> int | None:
        status = (await self._ask({"poll": pid}))["status"]
        return None if status is None else int(status)

    async def wait(self, pid: int) -> int:
        return int((await self._ask({"wait": pid}))["status"])

    async def aclose(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        await self._proc.wait()


if __name__ == "__main__":
    serve()
