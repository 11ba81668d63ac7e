#!/usr/bin/env python3
"""Scanner benchmark: one message per connection, as devices send, through mailproxy's relay
(without and with the upstream session pool) and its outbound queue, vs. directly to Postfix.

    /opt/mpvenv/bin/python bench/queue_bench.py [--small 100] [--large 10] [--senders 10]
                                                [--rounds 3] [--json] [--keep]

The environment is smtp_bench.py's (test token server, CA, Dovecot, Postfix with LMTP
delivery held back), but the upstream is Postfix's submission port with STARTTLS, as
Microsoft 365 takes mail. Three proxies run as separate processes through the real CLI:
``relay`` (``[smtp] upstream_pool_idle = 0``: a full upstream login per client connection),
``pool`` (relay with the pool of logged-in upstream sessions) and ``queue`` (``[smtp]
delivery = "queue"``: 250 once the message is on disk, fsync on).

Every message is its own connection: connect, EHLO, AUTH, MAIL, RCPT, DATA, the message, QUIT
(the timer covers all of it). ``direct``: the same client with STARTTLS and XOAUTH2 (an access
token from the test authority) to Postfix's port 587. For the queue, the end-to-end delivery
rate is also measured: from the first message accepted to the proxy's queue empty (every
message accepted by Postfix).

Goals (issue 14): queue acceptance >= 0.8 x direct; pool >= 1.0 x direct for 10 KB messages
and >= 0.9 x direct for 1 MB.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from common import launch_proxy, machine_busy, progress, run, stop_proxy
from smtp_bench import (
    LOCAL_PASSWORD,
    TIMEOUT,
    USER,
    Environment,
    FastSmtp,
    make_message,
)

from tests.support.dovecot import free_port

SMALL = 10_000
LARGE = 1_000_000
PROXIES = ("relay", "pool", "queue")
PATHS = ("direct", *PROXIES)
GOALS = {"queue": 0.8, "pool": 1.0, "relay": None}
LARGE_POOL_GOAL = 0.9


class ScannerEnvironment(Environment):
    """smtp_bench's servers, three proxies, upstream over STARTTLS."""

    def __init__(self) -> None:
        super().__init__(deliver=False)
        self.ports: dict[str, int] = {}
        self.procs: dict[str, Any] = {}

    def _start_proxy(self) -> None:
        assert self.postfix is not None and self.token_server is not None and self.ca
        options = {"relay": {"upstream_pool_idle": "0"},
                   "pool": {"upstream_pool_idle": "60"},
                   "queue": {"delivery": '"queue"'}}
        for name in PROXIES:
            tmp = self.tmp / f"proxy-{name}"
            tmp.mkdir()
            port = free_port()
            self.procs[name] = launch_proxy(
                tmp, "smtp", port, USER, LOCAL_PASSWORD, self.token_server, self.ca.ca_cert,
                {"smtp_server": f'"{self.postfix.host}:{self.postfix.smtp_port}"',
                 "smtp_tls": '"starttls"'}, options[name])
            self.ports[name] = port
        # `run` watches one proxy process and prints its log on errors: the queue's.
        self.proxy = self.procs["queue"]
        self.proxy_log = self.tmp / "proxy-queue" / "proxy.log"

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc is not self.proxy:
                stop_proxy(proc)
        super().stop()

    def queued(self) -> int:
        messages = self.tmp / "proxy-queue" / "state" / "queue" / "messages"
        return len(os.listdir(messages)) if messages.is_dir() else 0

    def connect(self, path: str) -> FastSmtp:
        assert self.postfix is not None and self.token_server is not None and self.tls
        if path != "direct":
            client = FastSmtp.connect(self.ports[path])
            client.command("EHLO scanner.example.test", 250)
            plain = base64.b64encode(f"\0{USER}\0{LOCAL_PASSWORD}".encode()).decode()
            client.command(f"AUTH PLAIN {plain}", 235)
            return client
        client = FastSmtp.connect(self.postfix.smtp_port)
        try:
            client.command("EHLO scanner.example.test", 250)
            client.command("STARTTLS", 220)
            client.sock = self.tls.wrap_socket(client.sock, server_hostname="127.0.0.1")
            client.command("EHLO scanner.example.test", 250)
            token = self.token_server.authority.issue_access_token(USER)
            client.command("AUTH XOAUTH2", 334)
            sasl = base64.b64encode(f"user={USER}\x01auth=Bearer {token}\x01\x01".encode())
            client.command(sasl.decode(), 235)
        except BaseException:
            client.quit()
            raise
        return client


@dataclass
class Sample:
    messages: int
    seconds: float
    busy: float
    delivered_s: float | None = None  # queue: until the proxy's queue was empty


def run_once(env: ScannerEnvironment, path: str, message: bytes, count: int,
             senders: int) -> Sample:
    env.settle()
    shares = [count // senders + (1 if i < count % senders else 0) for i in range(senders)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(senders + 1, timeout=TIMEOUT)

    def sender(n: int) -> None:
        try:
            barrier.wait()
            for _ in range(n):
                client = env.connect(path)
                try:
                    client.send(USER, USER, message)
                finally:
                    client.quit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in shares]
    for t in threads:
        t.start()
    b0 = machine_busy()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(10 * TIMEOUT)
    accepted = time.perf_counter() - start
    b1 = machine_busy()
    if errors:
        raise RuntimeError(f"{path}: {errors[0]!r}") from errors[0]
    sample = Sample(count, accepted, (b1[0] - b0[0]) / max(1, b1[1] - b0[1]))
    if path == "queue":
        deadline = time.monotonic() + 10 * TIMEOUT
        while env.queued():
            if time.monotonic() > deadline:
                raise RuntimeError("the queue did not empty")
            time.sleep(0.01)
        sample.delivered_s = time.perf_counter() - start
    return sample


@dataclass
class Case:
    name: str
    size: int
    count: int
    senders: int


def measure(env: ScannerEnvironment, cases: list[Case], rounds: int) -> dict[str, Any]:
    rng = random.Random(14)
    out: dict[str, Any] = {"config": {"rounds": rounds, "cpus": os.cpu_count(),
                                      "python": sys.version.split()[0]}, "cases": {}}
    for case in cases:
        message = make_message(case.size, rng)
        samples: dict[str, list[Sample]] = {p: [] for p in PATHS}
        progress(f"{case.name}: warm-up")
        for path in PATHS:
            run_once(env, path, message, min(case.count, 2 * case.senders), case.senders)
        for r in range(rounds):
            for path in (PATHS if r % 2 == 0 else tuple(reversed(PATHS))):
                samples[path].append(run_once(env, path, message, case.count, case.senders))
            progress(f"{case.name} round {r + 1}/{rounds}: " + ", ".join(
                f"{p} {samples[p][-1].messages / samples[p][-1].seconds:.1f}" for p in PATHS))
        entry: dict[str, Any] = {"size": case.size, "messages": case.count,
                                 "senders": case.senders}
        for path, got in samples.items():
            rate = sum(s.messages for s in got) / sum(s.seconds for s in got)
            entry[path] = {"msg_s": rate, "busy": statistics.median(s.busy for s in got)}
            if path == "queue":
                entry[path]["delivered_msg_s"] = sum(s.messages for s in got) / sum(
                    s.delivered_s or 0 for s in got)
        direct = entry["direct"]["msg_s"]
        for path in PROXIES:
            ratio = entry[path]["msg_s"] / direct
            goal = GOALS[path]
            if path == "pool" and case.size == LARGE:
                goal = LARGE_POOL_GOAL
            entry[path]["ratio"] = ratio
            entry[path]["verdict"] = "-" if goal is None else (
                "PASS" if ratio >= goal else "MISS")
        out["cases"][case.name] = entry
    env.settle()
    return out


def report(r: dict[str, Any]) -> None:
    c = r["config"]
    print(f"\nmailproxy scanner benchmark: one message per connection, {c['rounds']} rounds, "
          f"{c['cpus']} CPUs, Python {c['python']}; upstream Postfix 587 STARTTLS")
    print(f"\n  {'case':<22}{'path':<8}{'msg/s':>9}{'busy':>6}   ratio to direct")
    for name, e in r["cases"].items():
        for i, path in enumerate(PATHS):
            p = e[path]
            tail = "" if path == "direct" else f"   {p['ratio']:.2f} {p['verdict']}"
            if path == "queue":
                tail += f"  (delivered end to end: {p['delivered_msg_s']:.1f} msg/s)"
            print(f"  {name if i == 0 else '':<22}{path:<8}{p['msg_s']:>9.1f}"
                  f"{p['busy'] * 100:>5.0f}%{tail}")
    print("\n  goals: queue >= 0.8, pool >= 1.0 (1 MB: >= 0.9) of direct")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=100, help="10 KB messages per sample")
    parser.add_argument("--large", type=int, default=10, help="1 MB messages per sample")
    parser.add_argument("--senders", type=int, default=10, help="concurrent senders")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per case and path")
    parser.add_argument("--keep", action="store_true", help="pause before cleaning up")
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = parser.parse_args()
    cases = [
        Case("10 KB x1 sender", SMALL, args.small, 1),
        Case(f"10 KB x{args.senders} senders", SMALL, args.small, args.senders),
        Case("1 MB x1 sender", LARGE, args.large, 1),
    ]
    env = ScannerEnvironment()
    return run(env, lambda: measure(env, cases, args.rounds), args.keep, args.json, report)


if __name__ == "__main__":
    sys.exit(main())
