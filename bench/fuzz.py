"""Fuzz the pre-login dialogues (IMAP, POP3, SMTP) of a running mailproxy daemon.

    python bench/fuzz.py [--protocols imap,pop3,smtp] [--inputs 1000000] [--seconds 0]
                         [--seed N] [--connections 64] [--sources 64] [--per-connection 200]
                         [--quick 0.3] [--timeout 10] [--json]

The daemon runs as its own process (``mailproxy run``) on free loopback ports, with one
account provisioned through the CLI: a login with its password runs the whole local path (the
vault, the token request to an endpoint that refuses connections) and is answered with a
temporary failure; no upstream server is needed. ``--connections`` connections at once, from
``--sources`` loopback addresses in turn, each send many inputs (see fuzzgen.py) in batches,
each batch followed by a probe command; every reply is checked (fuzzcheck.py). Reported:

* crash: the daemon exited;
* log: a traceback or an ERROR line in the daemon's log, or control bytes written into it;
* malformed: a reply that breaks the protocol's reply grammar (fuzzcheck.py says how), or
  bytes in the clear after the STARTTLS go-ahead;
* hang: no answer to the probe within ``--timeout`` (after resynchronizing: a line long
  enough to finish any literal, and the probe again), or no close after garbage in place of
  a TLS handshake;
* rst: the daemon reset the connection (a reset can lose the last reply).

Where the time goes is printed per protocol: this client's CPU, the daemon's, and how many
password checks (a scrypt each) the inputs cost it.

The run is reproducible: each connection's inputs come from ``(seed, protocol, connection
number)``. For each kind of finding the smallest input seen is printed, and shrunk (``--shrink``,
on by default) by replaying parts of it on fresh connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(HERE), str(REPO)):
    if path not in sys.path:
        sys.path.insert(0, path)

from common import die_with_parent, proc_cpu  # noqa: E402
from fuzzcheck import Checker, make_checker  # noqa: E402
from fuzzgen import PASSWORD, USER, Inputs  # noqa: E402

from tests.support.servers import free_port  # noqa: E402

PROTOCOLS = ("imap", "pop3", "smtp")
# Connections at once: enough that the daemon always has work while some wait for replies.
CONNECTIONS = 64
# How long a batch's replies may take before the fuzzer resynchronizes (an IMAP literal
# waiting for its bytes); a wait, not a hang, which only --timeout makes.
QUICK = 0.3
# Finishes any literal the daemon may still be reading (max_literal is 8,192 before login);
# the probe after it ends the line: whatever state the dialogue is in, a reply is due then.
_FLUSH = {"imap": b"\r\n" + b"X" * 8200, "pop3": b"", "smtp": b""}
# After the STARTTLS go-ahead: completes any TLS record (at most 2^14 + 2,048 octets; an
# SSLv2-style header says up to 32,767) that the bytes sent since may have begun.
_TLS_FILLER = b"X" * 33000 + b"\r\n"  # a line end: a daemon not doing TLS answers (malformed)
_LOG_PROBLEM = re.compile(rb"Traceback|\bERROR\b|CRITICAL")
# A refused login that cost the daemon a password check (scrypt, ~0.1 s of a core).
_LOG_CHECKED = re.compile(rb"refused for .* \((?:credentials|authorization)\)")
_LOG_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


# -- the daemon ----------------------------------------------------------------------------


class Daemon:
    """``mailproxy run`` in a temporary directory, with one account and all three listeners."""

    def __init__(self, tmp: Path, options: dict[str, dict[str, str]] | None = None) -> None:
        self.tmp = tmp
        self.log_path = tmp / "proxy.log"
        self.ports = {name: free_port() for name in PROTOCOLS}
        self.proc: subprocess.Popen[bytes] | None = None
        self._options = options or {}
        # Bound but not listening: connections to it are refused at once.
        self._dead = socket.socket()
        self._dead.bind(("127.0.0.1", 0))
        self._log_offset = 0
        self.password_checks = 0  # refused logins that ran a password check, so far

    def start(self) -> None:
        dead = self._dead.getsockname()[1]
        lines = [f'state_dir = "{self.tmp / "state"}"', 'log_level = "info"',
                 "[admin]", 'listen = ""', "[tokens]", "retries = 0", "request_timeout = 5",
                 # The failure delay would throttle the fuzzer's wrong logins to one every 15 s
                 # per address: off. The limit per account stays (low): past it, wrong
                 # passwords for a name are refused without a password check (a scrypt each,
                 # the daemon's largest cost by far, and one at a time per address).
                 "[auth]", "failure_delay = 0", "max_failures_per_ip = 1000000000",
                 "max_failures_per_account = 5", "failure_window = 86400"]
        for name in PROTOCOLS:
            # No TLS listener: their default ports may be taken on a shared machine.
            lines += [f"[{name}]", f'listen = "127.0.0.1:{self.ports[name]}"', 'tls_listen = ""']
            lines += [f"{k} = {v}" for k, v in self._options.get(name, {}).items()]
        lines += ["[[accounts]]", f'address = "{USER}"', 'provider = "custom"',
                  'client_id = "fuzz"', f'token_url = "http://127.0.0.1:{dead}/token"',
                  'scopes = ["mail"]']
        for name in PROTOCOLS:
            lines += [f'{name}_server = "127.0.0.1:{dead}"', f'{name}_tls = "implicit"']
        config = self.tmp / "mailproxy.toml"
        config.write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPROXY_")}
        env["PYTHONPATH"] = str(REPO)
        base = [sys.executable, "-m", "proxy"]
        done = subprocess.run(
            [*base, "token", "import", "--no-verify", "--config", str(config), USER],
            input=f"fuzz-refresh-token\n{PASSWORD}\n".encode(), capture_output=True, env=env,
            cwd=REPO, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"token import failed: {done.stderr.decode(errors='replace')}")
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*base, "run", "--config", str(config)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, env=env, cwd=REPO, start_new_session=True,
                preexec_fn=die_with_parent)
        deadline = time.monotonic() + 60
        for port in self.ports.values():
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n"
                                       f"{self.log_path.read_text(errors='replace')}")
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not start listening within 60 s")
                time.sleep(0.05)

    def cpu_seconds(self) -> float:
        if not self.alive():
            return 0.0
        assert self.proc is not None
        return proc_cpu(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mb(self) -> float:
        if not self.alive():
            return 0.0
        assert self.proc is not None
        with contextlib.suppress(OSError), open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def new_log_problems(self) -> list[str]:
        """Lines of the log written since the last call that show an error or hold control
        bytes (a client's bytes written raw into an admin's terminal)."""
        problems: list[str] = []
        with contextlib.suppress(OSError), self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            data = f.read()
            cut = data.rfind(b"\n") + 1
            self._log_offset += cut
            for line in data[:cut].splitlines():
                if _LOG_CHECKED.search(line):
                    self.password_checks += 1
                if _LOG_PROBLEM.search(line):
                    problems.append(f"log: {line[:200]!r}")
                elif _LOG_CONTROL.search(line):
                    problems.append(f"log holds control bytes: {line[:200]!r}")
        return problems

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._dead.close()


# -- one connection ------------------------------------------------------------------------


@dataclass
class Finding:
    kind: str  # malformed, hang, rst, log, crash
    protocol: str
    detail: str
    conn: int = -1  # connection number (with the seed: reproduces the inputs)
    script: list[bytes] = field(default_factory=list)  # what that connection wrote, in order
    local: str = ""  # its address and port, as the daemon's log lines show the client

    @property
    def size(self) -> int:
        return sum(len(s) for s in self.script)


@dataclass
class Stats:
    inputs: int = 0
    connections: int = 0
    bytes_sent: int = 0
    replies: int = 0
    resyncs: int = 0
    tls: int = 0  # connections that got the STARTTLS go-ahead (and ended there)
    sources: Counter[str] = field(default_factory=Counter)


class Connection:
    """A client connection: writes segments, reads and checks everything the daemon says."""

    def __init__(self, protocol: str, port: int, timeout: float,
                 source: str | None = None) -> None:
        self.protocol = protocol
        self.port = port
        self.timeout = timeout
        self.source = source  # local address (the daemon's checks take turns per address)
        self.checker: Checker = make_checker(protocol)
        self.problems: list[str] = []
        self.script: list[bytes] = []
        self.eof = False
        self.reset = False
        self._progress = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._probes = 0
        self.resyncs = 0
        self.local = ""

    async def __aenter__(self) -> Connection:
        local = (self.source, 0) if self.source else None
        reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port, local_addr=local), self.timeout)
        sock = self._writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local = "{}:{}".format(*sock.getsockname()[:2])  # in the daemon's log lines
        self._reader_task = asyncio.create_task(self._read(reader))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._writer is not None and self._reader_task is not None
        self._writer.transport.abort()
        self._reader_task.cancel()
        await asyncio.gather(self._reader_task, return_exceptions=True)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.read(65536):
                self.problems += self.checker.received(data)
                self._progress.set()
        except ConnectionError:  # a reset, or a write that found the connection reset
            self.reset = True
        else:
            self.problems += self.checker.closed()
        self.eof = True
        self._progress.set()

    async def write(self, segments: list[bytes]) -> None:
        assert self._writer is not None
        for i, segment in enumerate(segments):
            if self.eof:
                return
            self.script.append(segment)
            self.checker.sent(segment)
            self._writer.write(segment)
            if len(segments) > 1 and i < len(segments) - 1:
                await self._drain()
                await asyncio.sleep(0.001)  # its own segment on the wire
        await self._drain()

    async def _drain(self) -> None:
        assert self._writer is not None
        if not self._writer.transport.get_write_buffer_size():
            return  # all in the socket already (most writes): no task, no timer
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(self.timeout):
                await self._writer.drain()

    async def wait_settled(self, timeout: float) -> bool:
        """True when every reply due has come (or the daemon closed the connection)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not (self.eof or self.checker.settled()):
                    self._progress.clear()
                    await self._progress.wait()
        return self.eof or self.checker.settled()

    async def sync(self, quick: float) -> str | None:
        """Send the probe and wait for every reply due; resynchronize if the dialogue waits
        for more input (an IMAP literal). Returns a hang's description, or None."""
        self._probes += 1
        with contextlib.suppress(ConnectionError):
            await self.write([self.checker.probe(self._probes)])
        if await self.wait_settled(quick):
            return None
        if not self.checker.tls:
            self.resyncs += 1
            self._probes += 1
            with contextlib.suppress(ConnectionError):
                await self.write([_FLUSH[self.protocol] + self.checker.probe(self._probes)])
            if await self.wait_settled(self.timeout):
                return None
        if self.checker.tls:
            return await self._after_go_ahead(quick)
        return f"no reply within {self.timeout:g} s after resynchronizing ({self.waiting()})"

    async def _after_go_ahead(self, quick: float) -> str | None:
        """STARTTLS was answered with the go-ahead, and what was sent since (the probe at
        least) is no TLS handshake: the daemon must close the connection, with nothing in
        the clear (the checker looks at that)."""
        if await self.wait_closed(quick):
            return None
        with contextlib.suppress(ConnectionError):
            await self.write([_TLS_FILLER])
        if await self.wait_closed(self.timeout):
            return None
        return f"no close within {self.timeout:g} s of garbage instead of a TLS handshake"

    async def wait_closed(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self.eof:
                    self._progress.clear()
                    await self._progress.wait()
        return self.eof

    def waiting(self) -> str:
        """What the checker still waits for, to tell hangs apart."""
        pending = getattr(self.checker, "pending", None)
        if pending:
            return f"{len(pending)} lines unanswered, the first {pending[0][:80]!r}"
        return f"{self.checker.replies} replies so far"


def category(detail: str) -> str:
    """A finding's description without the bytes it quotes."""
    return re.sub(r": b['\"].*", "", detail)


async def replay(protocol: str, port: int, script: list[bytes], timeout: float) -> list[str]:
    """Send ``script`` on a fresh connection, then a probe; what it shows, as
    ``kind: detail`` strings."""
    shown: list[str] = []
    async with Connection(protocol, port, timeout) as conn:
        await conn.wait_settled(timeout)
        with contextlib.suppress(ConnectionError):
            await conn.write(script)
        hang = await conn.sync(min(0.5, timeout))
        if hang:
            shown.append(f"hang: {hang}")
        if not conn.eof:
            await asyncio.sleep(0.05)
        shown += [f"malformed: {p}" for p in conn.problems]
        if conn.reset:
            shown.append("rst: connection reset by the daemon")
    return shown


async def shrink(finding: Finding, port: int, timeout: float, budget: float) -> Finding:
    """Delta debugging on the bytes of ``finding.script``: drop chunks while a replay on a
    fresh connection still shows a finding of the same kind and description. Stops after
    ``budget`` seconds."""
    if finding.kind not in ("malformed", "rst"):
        return finding
    data = b"".join(finding.script)
    want = f"{finding.kind}: {category(finding.detail)}"
    deadline = time.monotonic() + budget
    detail = finding.detail

    async def shows(candidate: bytes) -> bool:
        nonlocal detail
        for _ in range(2 if finding.kind == "rst" else 1):
            for shown in await replay(finding.protocol, port, [candidate], timeout):
                if category(shown) == want:
                    detail = shown.split(": ", 1)[1]
                    return True
        return False

    if not await shows(data):
        return finding  # needs the timing of the original run
    chunks = 2
    while len(data) > 1 and time.monotonic() < deadline:
        size = max(1, len(data) // chunks)
        for start in range(0, len(data), size):
            candidate = data[:start] + data[start + size:]
            if candidate and await shows(candidate):
                data = candidate
                chunks = max(chunks - 1, 2)
                break
            if time.monotonic() > deadline:
                break
        else:
            if size == 1:
                break
            chunks = min(chunks * 2, len(data))
    return Finding(finding.kind, finding.protocol, detail + " (shrunk)", finding.conn, [data],
                   finding.local)


# -- the run -------------------------------------------------------------------------------


@dataclass
class Run:
    protocol: str
    port: int
    seed: int
    inputs: int
    seconds: float
    connections: int
    per_connection: int
    timeout: float
    daemon: Daemon | None = None
    only: int | None = None  # run just this connection (to reproduce a finding)
    # Local addresses, one per worker in turn: the daemon checks one password at a time
    # per client address, which would make the workers wait for each other.
    sources: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    quick: float = QUICK
    stats: Stats = field(default_factory=Stats)
    findings: list[Finding] = field(default_factory=list)
    _next_conn: int = 0

    def _budget_left(self, started: float) -> bool:
        if self.inputs and self.stats.inputs >= self.inputs:
            return False
        return not (self.seconds and time.monotonic() - started >= self.seconds)

    async def _worker(self, started: float, source: str) -> None:
        while self._budget_left(started):
            if self.daemon is not None and not self.daemon.alive():
                return
            number = self._next_conn if self.only is None else self.only
            self._next_conn += 1
            if self.only is not None and self._next_conn > 1:
                return
            rng = random.Random(f"{self.seed}:{self.protocol}:{number}")
            await self._connection(number, rng, started, source)

    async def _connection(self, number: int, rng: random.Random, started: float,
                          source: str) -> None:
        inputs = Inputs(self.protocol, rng)
        self.stats.connections += 1
        try:
            conn = Connection(self.protocol, self.port, self.timeout, source)
            async with conn:
                if not await conn.wait_settled(self.timeout):
                    self._found("hang", "no greeting", number, conn.script)
                    return
                sent = 0
                while sent < self.per_connection and not conn.eof and self._budget_left(started):
                    for _ in range(rng.randrange(1, 16)):
                        source, segments = inputs.next()
                        self.stats.sources[source] += 1
                        self.stats.inputs += 1
                        self.stats.bytes_sent += sum(len(s) for s in segments)
                        sent += 1
                        with contextlib.suppress(ConnectionError):
                            await conn.write(segments)
                    hang = await conn.sync(self.quick)
                    if conn.problems:
                        for problem in conn.problems:
                            self._found("malformed", problem, number, conn.script, conn.local)
                        conn.problems.clear()
                    if hang:
                        self._found("hang", hang, number, conn.script, conn.local)
                        return
                if conn.eof:
                    await asyncio.sleep(0)
                for problem in conn.problems:
                    self._found("malformed", problem, number, conn.script, conn.local)
                # After the STARTTLS go-ahead the daemon closes on garbage it has not read:
                # the reset can take the go-ahead with it, so any STARTTLS sent excuses one.
                if conn.reset and not conn.checker.starttls_sent:
                    self._found("rst", "connection reset by the daemon", number, conn.script,
                                conn.local)
                self.stats.replies += conn.checker.replies
                self.stats.resyncs += conn.resyncs
                self.stats.tls += conn.checker.tls
        except (ConnectionRefusedError, TimeoutError) as exc:
            if self.daemon is None or self.daemon.alive():
                self._found("hang", f"cannot connect: {exc!r}", number, [])

    def _found(self, kind: str, detail: str, conn: int, script: list[bytes],
               local: str = "") -> None:
        self.findings.append(Finding(kind, self.protocol, detail, conn, list(script), local))

    async def run(self) -> None:
        started = time.monotonic()
        async with asyncio.TaskGroup() as group:
            watch = group.create_task(self._watch(started))
            async with asyncio.TaskGroup() as workers:
                for i in range(self.connections):
                    workers.create_task(self._worker(started,
                                                     self.sources[i % len(self.sources)]))
            watch.cancel()
        if self.daemon is not None:
            for line in self.daemon.new_log_problems():
                self._found("log", line, -1, [])

    async def _watch(self, started: float) -> None:
        last = time.monotonic()
        while self._budget_left(started) and (self.daemon is None or self.daemon.alive()):
            await asyncio.sleep(0.5)
            if self.daemon is not None:
                for line in self.daemon.new_log_problems():
                    self._found("log", line, -1, [])
            if time.monotonic() - last >= 10:
                last = time.monotonic()
                progress(f"{self.protocol}: {self.stats.inputs} inputs, "
                         f"{len(self.findings)} findings, {time.monotonic() - started:.0f} s")
        if self.daemon is not None and not self.daemon.alive():
            code = self.daemon.proc.returncode if self.daemon.proc else None
            self._found("crash", f"the daemon exited with {code}", -1, [])


def progress(message: str) -> None:
    print(f"[fuzz] {message}", file=sys.stderr, flush=True)


def summarize(run: Run, elapsed: float) -> dict[str, Any]:
    kinds = Counter(f.kind for f in run.findings)
    details: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for f in run.findings:
        name = f"{f.kind}: {category(f.detail)}"
        details[name] += 1
        examples.setdefault(name, f.detail)
    return {
        "protocol": run.protocol, "inputs": run.stats.inputs,
        "connections": run.stats.connections, "replies": run.stats.replies,
        "bytes_sent": run.stats.bytes_sent, "resyncs": run.stats.resyncs,
        "tls": run.stats.tls, "sources": dict(run.stats.sources), "seconds": round(elapsed, 1),
        "inputs_per_s": round(run.stats.inputs / elapsed) if elapsed else 0,
        "crashes": kinds["crash"], "hangs": kinds["hang"], "malformed": kinds["malformed"],
        "rst": kinds["rst"], "log": kinds["log"], "findings": dict(details.most_common(30)),
        "examples": {k: examples[k] for k, _ in details.most_common(30)},
    }


def local_sources(count: int) -> list[str]:
    """``count`` loopback addresses to connect from (Linux routes all of 127/8 to the
    loopback interface); just 127.0.0.1 where others cannot be bound."""
    sources = [f"127.0.{i // 250}.{i % 250 + 1}" for i in range(max(1, count))]
    with socket.socket() as probe:
        try:
            probe.bind((sources[-1], 0))
        except OSError:
            return ["127.0.0.1"]
    return sources


async def fuzz(protocols: list[str], *, inputs: int, seconds: float, seed: int,
               connections: int = CONNECTIONS, per_connection: int = 200,
               timeout: float = 10.0, shrink_budget: float = 20.0,
               daemon: Daemon | None = None, only: int | None = None,
               ports: dict[str, int] | None = None, sources: int = CONNECTIONS,
               quick: float = QUICK) -> tuple[list[dict[str, Any]], list[Finding]]:
    """Run each protocol in turn; returns the summaries and the smallest finding of each
    (protocol, kind), shrunk."""
    summaries: list[dict[str, Any]] = []
    smallest: list[Finding] = []
    addresses = local_sources(sources)
    for protocol in protocols:
        port = (ports or {}).get(protocol) or (daemon.ports[protocol] if daemon else 0)
        run = Run(protocol, port, seed, inputs, seconds, connections, per_connection, timeout,
                  daemon, only, addresses, quick)
        started = time.monotonic()
        cpu = (time.process_time(), daemon.cpu_seconds() if daemon else 0.0,
               daemon.password_checks if daemon else 0)
        await run.run()
        summary = summarize(run, time.monotonic() - started)
        # Where the time went: this client's CPU, the daemon's, and its password checks.
        summary["client_cpu_s"] = round(time.process_time() - cpu[0], 1)
        if daemon is not None:
            summary["daemon_cpu_s"] = round(daemon.cpu_seconds() - cpu[1], 1)
            summary["password_checks"] = daemon.password_checks - cpu[2]
        summaries.append(summary)
        best: dict[str, Finding] = {}
        for finding in run.findings:
            if finding.kind not in best or finding.size < best[finding.kind].size:
                best[finding.kind] = finding
        for finding in best.values():
            if shrink_budget > 0 and (daemon is None or daemon.alive()):
                finding = await shrink(finding, port, min(timeout, 2.0), shrink_budget)
            smallest.append(finding)
    return summaries, smallest


def report(summaries: list[dict[str, Any]], smallest: list[Finding], seed: int) -> None:
    print(f"seed {seed}")
    print(f"{'protocol':8} {'inputs':>9} {'conns':>7} {'inputs/s':>8} {'crash':>5} {'hang':>5} "
          f"{'malformed':>9} {'rst':>5} {'log':>5} {'resyncs':>7}")
    for s in summaries:
        print(f"{s['protocol']:8} {s['inputs']:9} {s['connections']:7} {s['inputs_per_s']:8} "
              f"{s['crashes']:5} {s['hangs']:5} {s['malformed']:9} {s['rst']:5} {s['log']:5} "
              f"{s['resyncs']:7}")
    for s in summaries:
        print(f"  {s['protocol']}: {s['seconds']} s; CPU: client {s['client_cpu_s']} s, daemon "
              f"{s.get('daemon_cpu_s', '?')} s; {s.get('password_checks', '?')} password checks")
    for s in summaries:
        for detail, count in s["findings"].items():
            print(f"  {s['protocol']}: {count:7} x {detail}")
            if s["examples"][detail] != detail:
                print(f"           e.g. {s['examples'][detail][:300]}")
    for f in smallest:
        script = b"".join(f.script)
        print(f"\nsmallest {f.protocol} {f.kind} (connection {f.conn} from {f.local or '?'}, "
              f"{len(script)} bytes): {f.detail}\n  input: {script[-2000:]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--inputs", type=int, default=1_000_000, help="per protocol (0: no cap)")
    parser.add_argument("--seconds", type=float, default=0, help="per protocol (0: no cap)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--connections", type=int, default=CONNECTIONS, help="at once")
    parser.add_argument("--sources", type=int, default=CONNECTIONS,
                        help="loopback addresses to connect from, in turn")
    parser.add_argument("--quick", type=float, default=QUICK,
                        help="seconds to wait for the replies to a batch before resyncing")
    parser.add_argument("--per-connection", type=int, default=200,
                        help="inputs on one connection before the next")
    parser.add_argument("--timeout", type=float, default=10.0, help="for a reply (a hang)")
    parser.add_argument("--shrink", type=float, default=20.0,
                        help="seconds to shrink each smallest finding (0: off)")
    parser.add_argument("--connection", type=int, default=None,
                        help="run only this connection of the seed (reproduces a finding)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the daemon's directory")
    args = parser.parse_args(argv)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not protocols or any(p not in PROTOCOLS for p in protocols):
        parser.error(f"--protocols: a list of {', '.join(PROTOCOLS)}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    progress(f"seed {seed}")
    # The client's own writes to connections the daemon closed are expected here.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    tmp = Path(tempfile.mkdtemp(prefix="mailproxy-fuzz-"))
    daemon = Daemon(tmp)
    try:
        daemon.start()
        rss_before = daemon.rss_mb()
        summaries, smallest = asyncio.run(fuzz(
            protocols, inputs=args.inputs, seconds=args.seconds, seed=seed,
            connections=args.connections, per_connection=args.per_connection,
            timeout=args.timeout, shrink_budget=args.shrink, daemon=daemon,
            only=args.connection, sources=args.sources, quick=args.quick))
        rss_after = daemon.rss_mb()
    except KeyboardInterrupt:
        return 130
    finally:
        daemon.stop()
        if args.keep:
            progress(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps({"seed": seed, "protocols": summaries,
                          "rss_mb": [round(rss_before, 1), round(rss_after, 1)],
                          "smallest": [{"protocol": f.protocol, "kind": f.kind,
                                        "detail": f.detail, "connection": f.conn,
                                        "from": f.local,
                                        "input": repr(b"".join(f.script))}
                                       for f in smallest]}, indent=2))
    else:
        report(summaries, smallest, seed)
        print(f"\ndaemon RSS {rss_before:.0f} MB before, {rss_after:.0f} MB after")
    total = sum(s["crashes"] + s["hangs"] + s["malformed"] + s["rst"] + s["log"]
                for s in summaries)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
