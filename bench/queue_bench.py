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

Printed per case (10 KB from 1 and from ``--senders`` senders, 1 MB from one): every path's
msg/s and its ratio to direct; the queue's acceptance against relay mode with and without
the pool; the pool against no pool; the queue's end-to-end rate and its ratio to direct.

Goals (issue 14): queue acceptance >= 0.8 x direct; pool >= 1.0 x direct for 10 KB messages
and >= 0.9 x direct for 1 MB.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import (
    LARGE,
    Case,
    case_arguments,
    cases_of,
    launch_proxy,
    machine_busy,
    run,
    run_senders,
    sample_rounds,
    stop_proxy,
)
from smtp_bench import (
    LOCAL_PASSWORD,
    TIMEOUT,
    USER,
    Environment,
    FastSmtp,
    make_message,
)

from tests.support.dovecot import free_port

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
        if path == "direct":
            return self.direct_client(starttls=True)
        return self.proxy_client(self.ports[path])


@dataclass
class Sample:
    messages: int
    seconds: float
    busy: float
    delivered_s: float | None = None  # queue: until the proxy's queue was empty


def run_once(env: ScannerEnvironment, path: str, message: bytes, count: int,
             senders: int) -> Sample:
    """``count`` messages from ``senders`` threads, each message its own connection (the
    login is timed too)."""
    env.settle()

    def prepare(n: int) -> Callable[[], None]:
        def work() -> None:
            for _ in range(n):
                client = env.connect(path)
                try:
                    client.send(USER, USER, message)
                finally:
                    client.quit()

        return work

    timed = run_senders(count, senders, prepare, machine_busy, TIMEOUT, path)
    (b0, t0), (b1, t1) = timed.before, timed.after
    sample = Sample(count, timed.seconds, (b1 - b0) / max(1, t1 - t0))
    if path == "queue":
        deadline = time.monotonic() + 10 * TIMEOUT
        while env.queued():
            if time.monotonic() > deadline:
                raise RuntimeError("the queue did not empty")
            time.sleep(0.01)
        sample.delivered_s = time.perf_counter() - timed.start
    return sample


def sampler(env: ScannerEnvironment, message: bytes, senders: int
            ) -> Callable[[str, int], Sample]:
    return lambda path, count: run_once(env, path, message, count, senders)


def measure(env: ScannerEnvironment, cases: list[Case], rounds: int) -> dict[str, Any]:
    rng = random.Random(14)
    out: dict[str, Any] = {"config": {"rounds": rounds, "cpus": os.cpu_count(),
                                      "python": sys.version.split()[0]}, "cases": {}}
    for case in cases:
        samples = sample_rounds(case, PATHS, rounds,
                                sampler(env, make_message(case.size, rng), case.senders),
                                lambda sample: sample.messages / sample.seconds)
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
        queue, pool, relay = (entry[p]["msg_s"] for p in ("queue", "pool", "relay"))
        entry["ratios"] = {
            "queue_to_direct": queue / direct,
            "queue_to_relay_pool": queue / pool,
            "queue_to_relay_no_pool": queue / relay,
            "pool_to_no_pool": pool / relay,
            "queue_delivered_to_direct": entry["queue"]["delivered_msg_s"] / direct,
        }
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
            print(f"  {name if i == 0 else '':<22}{path:<8}{p['msg_s']:>9.1f}"
                  f"{p['busy'] * 100:>5.0f}%{tail}")
        q = e["ratios"]
        print(f"  {'':<22}queue/relay {q['queue_to_relay_pool']:.2f} (relay with the pool), "
              f"{q['queue_to_relay_no_pool']:.2f} (without); pool/no pool "
              f"{q['pool_to_no_pool']:.2f}")
        print(f"  {'':<22}queue end to end {e['queue']['delivered_msg_s']:.1f} msg/s, "
              f"{q['queue_delivered_to_direct']:.2f} of direct")
    print("\n  relay: [smtp] upstream_pool_idle = 0 (an upstream login per connection);"
          "\n  pool: relay with the pool; queue: delivery = \"queue\" (250 once on disk, fsync"
          " on)")
    print("  goals: queue >= 0.8, pool >= 1.0 (1 MB: >= 0.9) of direct")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    case_arguments(parser, small=100, large=10, rounds=3)
    args = parser.parse_args()
    cases = cases_of(parser, args, large_senders=False)
    env = ScannerEnvironment()
    return run(env, lambda: measure(env, cases, args.rounds), args.keep, args.json, report)


if __name__ == "__main__":
    sys.exit(main())
