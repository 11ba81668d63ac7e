#!/usr/bin/env python3
"""SMTP benchmark: sending through mailproxy vs. directly to the same Postfix with XOAUTH2.

    /opt/mpvenv/bin/python bench/smtp_bench.py [--small 200] [--large 30] [--senders 10]
                                               [--rounds 5] [--deliver] [--json] [--keep]

One run starts everything it needs in a temporary directory and removes it afterwards (also on
an error, Ctrl-C or SIGTERM): the test token/introspection server, a throw-away test CA, a
private Dovecot (SASL with the oauth2 passdb, LMTP delivery) and a private Postfix (submission
on an implicit-TLS port, Dovecot SASL, LMTP into Dovecot), see ``tests.support``. The proxy runs
as a **separate process** through its real command line (``token import
--no-verify``, ``run --config``) with ``smtp_tls = "implicit"`` to Postfix's smtps port, for the
same reason as in ``imap_bench.py``: 2 cores, and its CPU time can be read from /proc.

Paths, same client code (a small blocking-socket SMTP client, one thread per sender):

* ``direct``: client --TLS--> Postfix smtps; EHLO, two-step ``AUTH XOAUTH2`` with an access
  token from the test authority.
* ``proxy``:  client --plain loopback--> proxy --TLS--> Postfix smtps; EHLO, ``AUTH PLAIN`` with
  the local password (the proxy does the upstream TLS handshake and XOAUTH2).

Cases: ``--small`` messages of 10 KB and ``--large`` messages of 1 MB (MB = 10^6 bytes), each
sequentially (one session) and with ``--senders`` concurrent sessions sharing the messages. A
session is opened and logged in first (not timed, its login time is reported separately), then
the timer runs from the first MAIL FROM to the last 250 after the end of DATA: MAIL, RCPT, DATA,
the message, one command at a time like smtplib or aiosmtplib send it. Postfix acknowledges
once the message is queued. By default the benchmark holds delivery back
(``defer_transports = lmtp``) and empties the queue with ``postsuper -d ALL`` before every timed
sample (untimed): otherwise LMTP delivery into Dovecot competes for the 2 cores during the
sample, more of it inside the window on the slower path and more of it after the window on the
faster one. ``--deliver`` keeps delivery on; the benchmark then waits until the queue is empty
before each sample and deletes the delivered messages. Per case, ``--rounds`` rounds with the
path order alternating, after one untimed warm-up round. The headline ratio is proxy/direct of
the summed messages over the summed time of all rounds; the median of the per-round ratios is
also printed.

Goal: proxy >= 0.8 x direct in every case, printed as PASS/MISS. The exit status is 0 unless
something failed (1) or it was interrupted (130).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import random
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (  # the repository root goes on sys.path here
    Case,
    case_arguments,
    cases_of,
    client_socket,
    launch_proxy,
    machine_busy,
    proc_cpu,
    progress,
    run,
    run_senders,
    sample_rounds,
    stop_proxy,
)

from tests.support.dovecot import Dovecot, dovecot_available
from tests.support.postfix import Postfix, postfix_available
from tests.support.servers import free_port
from tests.support.tlsca import TestCA, make_test_ca
from tests.support.tokenserver import (
    TEST_CLIENT_ID,
    TEST_CLIENT_SECRET,
    TokenServer,
)

USER = "known-bench@example.test"  # tests.support.postfix accepts known-*@example.test
LOCAL_PASSWORD = "bench local password"
TIMEOUT = 60.0
GOAL = 0.8
PATHS = ("proxy", "direct")


# ------------------------------------------------------------------------------- the client


class SmtpError(RuntimeError):
    pass


class FastSmtp:
    """Blocking SMTP client: one command at a time, the message sent with one sendall."""

    STEPS = ("MAIL", "RCPT", "DATA", "end")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = b""
        # Seconds spent waiting in each step of ``send`` (summed over the messages sent).
        self.step_seconds = dict.fromkeys(self.STEPS, 0.0)

    @classmethod
    def connect(cls, port: int, context: ssl.SSLContext | None = None) -> FastSmtp:
        client = cls(client_socket(port, context, TIMEOUT))
        client.expect(220)
        return client

    def reply(self) -> tuple[int, bytes]:
        lines: list[bytes] = []
        while True:
            end = self.pending.find(b"\r\n")
            if end < 0:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise SmtpError(f"connection closed; got {b''.join(lines)!r}")
                self.pending += chunk
                continue
            line, self.pending = self.pending[:end], self.pending[end + 2:]
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines)

    def expect(self, code: int, what: str = "") -> bytes:
        got, text = self.reply()
        if got != code:
            raise SmtpError(f"{what or 'greeting'}: expected {code}, got {text!r}")
        return text

    def command(self, line: str, code: int) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.expect(code, line.split()[0] + (" " + line.split()[1]
                                                     if line.startswith("AUTH") else ""))

    def login_plain(self, user: str, password: str) -> None:
        """AUTH PLAIN, as a client logs in to the proxy with its local password."""
        plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        self.command(f"AUTH PLAIN {plain}", 235)

    def login_xoauth2(self, user: str, token: str) -> None:
        """Two-step AUTH XOAUTH2 with an access token, as a direct client logs in."""
        self.command("AUTH XOAUTH2", 334)
        sasl = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())
        self.command(sasl.decode(), 235)

    def send(self, sender: str, rcpt: str, stuffed: bytes) -> None:
        """One transaction; ``stuffed`` is dot-stuffed and ends with CRLF."""
        steps = self.step_seconds
        t0 = time.perf_counter()
        self.command(f"MAIL FROM:<{sender}> SIZE={len(stuffed)}", 250)
        t1 = time.perf_counter()
        self.command(f"RCPT TO:<{rcpt}>", 250)
        t2 = time.perf_counter()
        self.command("DATA", 354)
        t3 = time.perf_counter()
        self.sock.sendall(stuffed)
        self.sock.sendall(b".\r\n")
        self.expect(250, "end of DATA")
        t4 = time.perf_counter()
        steps["MAIL"] += t1 - t0
        steps["RCPT"] += t2 - t1
        steps["DATA"] += t3 - t2
        steps["end"] += t4 - t3

    def quit(self) -> None:
        with contextlib.suppress(OSError, SmtpError, ValueError):
            self.command("QUIT", 221)
        with contextlib.suppress(OSError):
            self.sock.close()


# ------------------------------------------------------------------------ the environment


def make_message(size: int, rng: random.Random) -> bytes:
    """A CRLF message of exactly ``size`` bytes: headers and base64 lines (no dot-stuffing)."""
    head = (
        f"From: Bench <{USER}>\r\nTo: Bench <{USER}>\r\n"
        f"Subject: Benchmark message of {size} bytes\r\n"
        "Date: Mon, 3 Jun 2024 10:00:00 +0000\r\n"
        f"Message-ID: <bench.{size}.{rng.getrandbits(48):012x}@example.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    body = base64.encodebytes(rng.randbytes(size)).replace(b"\n", b"\r\n")
    body = body[:size - len(head) - 2].rstrip(b"\r\n")
    body += b"A" * (size - len(head) - 2 - len(body))
    message = head + body + b"\r\n"
    assert len(message) == size and b"\r\n." not in message
    return message


class BenchPostfix(Postfix):
    """The test Postfix; with ``deliver=False`` mail stays in the queue (no LMTP delivery)."""

    def __init__(self, root: Path, dovecot: Dovecot, deliver: bool) -> None:
        self.deliver = deliver
        super().__init__(root, dovecot)

    def _main_cf(self) -> str:
        return super()._main_cf() + ("" if self.deliver else "defer_transports = lmtp\n")


class Environment:
    def __init__(self, deliver: bool, strict: bool = False) -> None:
        self.deliver = deliver
        self.strict = strict
        self.tmp = Path(tempfile.mkdtemp(prefix="mailproxy-smtp-bench-"))
        self.tmp.chmod(0o755)  # Dovecot's and Postfix's unprivileged users traverse it
        self.token_server: TokenServer | None = None
        self.dovecot: Dovecot | None = None
        self.postfix: Postfix | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self.proxy_port = 0
        self.proxy_log = self.tmp / "proxy.log"
        self.ca: TestCA | None = None
        self.tls: ssl.SSLContext | None = None

    def start(self) -> None:
        for ok, reason in (dovecot_available(), postfix_available()):
            if not ok:
                raise RuntimeError(reason)
        self.ca = make_test_ca(self.tmp / "ca")
        self.tls = ssl.create_default_context(cafile=str(self.ca.ca_cert))
        self.token_server = TokenServer()
        self.token_server.authority.register_client(TEST_CLIENT_ID, TEST_CLIENT_SECRET)
        progress("starting Dovecot and Postfix")
        self.dovecot = Dovecot(self.tmp / "dovecot", self.ca,
                               self.token_server.introspection_url)
        self.dovecot.start()
        self.postfix = BenchPostfix(self.tmp / "postfix", self.dovecot, self.deliver)
        self.postfix.start()
        self._start_proxy()

    def _start_proxy(self) -> None:
        assert self.postfix is not None and self.token_server is not None and self.ca
        self.proxy_port = free_port()
        self.proxy = launch_proxy(
            self.tmp, "smtp", self.proxy_port, USER, LOCAL_PASSWORD, self.token_server,
            self.ca.ca_cert, {"smtp_server": f'"{self.postfix.host}:{self.postfix.smtps_port}"',
                              "smtp_tls": '"implicit"'},
            {"strict_one_to_one": "true" if self.strict else "false"})

    def server_log_tail(self) -> str:
        return self.postfix.log_tail() if self.postfix is not None else ""

    def stop(self) -> None:
        if self.proxy is not None:
            proc, self.proxy = self.proxy, None
            stop_proxy(proc)
        for server in (self.postfix, self.dovecot):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        if self.token_server is not None:
            with contextlib.suppress(Exception):
                self.token_server.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- clients -------------------------------------------------------------------------

    def login(self, path: str) -> FastSmtp:
        if path == "proxy":
            return self.proxy_client(self.proxy_port)
        return self.direct_client(starttls=False)

    def proxy_client(self, port: int) -> FastSmtp:
        """Logged in to the proxy on ``port``: EHLO, AUTH PLAIN with the local password."""
        client = FastSmtp.connect(port)
        try:
            client.command("EHLO bench.example.test", 250)
            client.login_plain(USER, LOCAL_PASSWORD)
        except BaseException:
            client.quit()
            raise
        return client

    def direct_client(self, *, starttls: bool) -> FastSmtp:
        """Logged in to Postfix with XOAUTH2 and an access token from the test authority:
        on its implicit-TLS port, or (``starttls``) on 587 with STARTTLS."""
        assert self.postfix is not None and self.token_server is not None and self.tls
        if starttls:
            client = FastSmtp.connect(self.postfix.smtp_port)
        else:
            client = FastSmtp.connect(self.postfix.smtps_port, self.tls)
        try:
            client.command("EHLO bench.example.test", 250)
            if starttls:
                client.command("STARTTLS", 220)
                client.sock = self.tls.wrap_socket(client.sock, server_hostname="127.0.0.1")
                client.command("EHLO bench.example.test", 250)
            client.login_xoauth2(USER, self.token_server.authority.issue_access_token(USER))
        except BaseException:
            client.quit()
            raise
        return client

    def queue_size(self) -> int:
        assert self.postfix is not None
        count = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(self.postfix.queue_dir / sub):
                count += len(files)
        return count

    def settle(self, timeout: float = 60.0) -> None:
        """Empty Postfix's queue (delete, or wait for delivery and delete the delivered mail)."""
        assert self.dovecot is not None and self.postfix is not None
        if not self.deliver and self.queue_size():
            subprocess.run(["/usr/sbin/postsuper", "-c", str(self.postfix.config_dir), "-d",
                            "ALL"], capture_output=True, check=True, timeout=60)
        deadline = time.monotonic() + timeout
        while self.queue_size():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Postfix queue not empty after {timeout:.0f} s:\n"
                                   f"{self.postfix.log_tail()}")
            time.sleep(0.02)
        for sub in ("new", "cur"):
            d = self.dovecot.maildir(USER) / sub
            if d.is_dir():
                for p in d.iterdir():
                    p.unlink(missing_ok=True)


# -------------------------------------------------------------------------- measurements


@dataclass
class Sample:
    messages: int
    bytes: int
    seconds: float
    login_ms: float  # mean per session
    client_cpu: float
    proxy_cpu: float
    machine_busy: float
    step_seconds: dict[str, float]  # summed over all messages of all sessions

    @property
    def msg_s(self) -> float:
        return self.messages / self.seconds

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / 1e6


def run_once(env: Environment, path: str, message: bytes, count: int, senders: int) -> Sample:
    """``count`` messages over ``senders`` sessions, one thread each, logged in first; the
    sending is timed."""
    env.settle()
    proxy = env.proxy
    assert proxy is not None
    logins: list[float] = []
    steps = dict.fromkeys(FastSmtp.STEPS, 0.0)
    lock = threading.Lock()

    def prepare(n: int) -> Callable[[], None]:
        t0 = time.perf_counter()
        client = env.login(path)
        with lock:
            logins.append((time.perf_counter() - t0) * 1000)

        def work() -> None:
            try:
                for _ in range(n):
                    client.send(USER, USER, message)
                with lock:
                    for step, seconds in client.step_seconds.items():
                        steps[step] += seconds
            finally:
                client.quit()

        return work

    def meter() -> tuple[float, float, tuple[float, float]]:
        return time.process_time(), proc_cpu(proxy.pid), machine_busy()

    timed = run_senders(count, senders, prepare, meter, TIMEOUT, path)
    (c0, p0, b0), (c1, p1, b1) = timed.before, timed.after
    busy = (b1[0] - b0[0]) / max(1, b1[1] - b0[1])
    return Sample(count, count * len(message), timed.seconds, statistics.fmean(logins),
                  c1 - c0, p1 - p0, busy, steps)


def sampler(env: Environment, message: bytes, senders: int) -> Callable[[str, int], Sample]:
    return lambda path, count: run_once(env, path, message, count, senders)


def measure(env: Environment, cases: list[Case], rounds: int) -> dict[str, dict[str, list[Sample]]]:
    rng = random.Random(1234)
    bodies = {size: make_message(size, rng) for size in {c.size for c in cases}}
    results: dict[str, dict[str, list[Sample]]] = {}
    for case in cases:
        message = bodies[case.size]
        results[case.name] = sample_rounds(case, PATHS, rounds,
                                           sampler(env, message, case.senders),
                                           lambda sample: sample.msg_s)
    env.settle()
    return results


# ------------------------------------------------------------------------------ reporting


def summarize(cases: list[Case], results: dict[str, dict[str, list[Sample]]],
              args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "config": {"deliver": args.deliver, "strict": args.strict, "rounds": args.rounds,
                   "senders": args.senders,
                   "cpus": os.cpu_count(), "python": sys.version.split()[0], "goal": GOAL},
        "cases": {},
    }
    for case in cases:
        entry: dict[str, Any] = {"size": case.size, "messages": case.count,
                                 "senders": case.senders}
        for path, samples in results[case.name].items():
            seconds = sum(s.seconds for s in samples)
            messages = sum(s.messages for s in samples)
            nbytes = sum(s.bytes for s in samples)
            entry[path] = {
                "msg_s": messages / seconds,
                "mb_s": nbytes / seconds / 1e6,
                "msg_s_rounds": [round(s.msg_s, 2) for s in samples],
                "login_ms": statistics.fmean(s.login_ms for s in samples),
                "client_cpu_per_wall": sum(s.client_cpu for s in samples) / seconds,
                "proxy_cpu_per_wall": sum(s.proxy_cpu for s in samples) / seconds,
                "machine_busy": statistics.median(s.machine_busy for s in samples),
                # Mean milliseconds per message a sender waits in each step.
                "step_ms": {step: sum(s.step_seconds[step] for s in samples) / messages * 1000
                            for step in FastSmtp.STEPS},
            }
        ratio = entry["proxy"]["msg_s"] / entry["direct"]["msg_s"]
        entry["ratio"] = ratio
        entry["paired_ratio_median"] = statistics.median(
            p.msg_s / d.msg_s for p, d in zip(results[case.name]["proxy"],
                                              results[case.name]["direct"], strict=True))
        entry["verdict"] = "PASS" if ratio >= GOAL else "MISS"
        out["cases"][case.name] = entry
    return out


def print_report(r: dict[str, Any]) -> None:
    c = r["config"]
    print(f"\nmailproxy SMTP benchmark: {c['rounds']} rounds per case, {c['cpus']} CPUs, "
          f"Python {c['python']}, LMTP delivery {'on' if c['deliver'] else 'held back'}, "
          f"strict_one_to_one {'on' if c['strict'] else 'off'}"
          " (MB = 10^6 bytes; sending timed, login not)")
    print(f"\n  {'case':<22}{'path':<8}{'msg/s':>9}{'MB/s':>8}{'login ms':>10}"
          f"{'client CPU':>12}{'proxy CPU':>11}{'busy':>6}   ratio")
    for name, e in r["cases"].items():
        for path in PATHS:
            p = e[path]
            tail = ""
            if path == "proxy":
                tail = (f"   {e['ratio']:.3f} {e['verdict']}"
                        f"  (per-round median {e['paired_ratio_median']:.3f})")
            proxy_cpu = f"{p['proxy_cpu_per_wall'] * 100:.0f}%" if path == "proxy" else "-"
            print(f"  {name if path == 'proxy' else '':<22}{path:<8}{p['msg_s']:>9.1f}"
                  f"{p['mb_s']:>8.1f}{p['login_ms']:>10.1f}"
                  f"{p['client_cpu_per_wall'] * 100:>11.0f}%{proxy_cpu:>11}"
                  f"{p['machine_busy'] * 100:>5.0f}%{tail}")
    print("\n  per message, ms a sender waits for each reply"
          " (MAIL / RCPT / DATA 354 / end of data)")
    for name, e in r["cases"].items():
        for path in PATHS:
            steps = " / ".join(f"{ms:.2f}" for ms in e[path]["step_ms"].values())
            print(f"  {name if path == 'proxy' else '':<22}{path:<8}{steps}")
    print("\n  proxy:  client --plain--> proxy --TLS--> Postfix smtps (AUTH PLAIN, local password)")
    print("  direct: client --TLS--> Postfix smtps (two-step AUTH XOAUTH2, access token)")
    print("  CPU columns: share of one core during the timed sending; busy: all CPUs")
    print(f"  ratio = proxy/direct msg/s (= MB/s), goal >= {c['goal']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    case_arguments(parser, small=200, large=30, rounds=5)
    parser.add_argument("--deliver", action="store_true",
                        help="let Postfix deliver into Dovecot (LMTP) during the samples")
    parser.add_argument("--strict", action="store_true",
                        help="run the proxy with [smtp] strict_one_to_one = true (MAIL and "
                        "DATA wait for the upstream's own replies)")
    args = parser.parse_args()
    cases = cases_of(parser, args, large_senders=True)
    env = Environment(args.deliver, args.strict)
    return run(env, lambda: summarize(cases, measure(env, cases, args.rounds), args),
               args.keep, args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
