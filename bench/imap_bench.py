#!/usr/bin/env python3
"""IMAP benchmark: mailproxy vs. talking to the server directly, against one private Dovecot.

    /opt/mpvenv/bin/python bench/imap_bench.py [--messages 300] [--size 102400] [--rounds 15]
                                               [--logins 200] [--json]

One run starts everything it needs in a temporary directory and removes it afterwards:

* the test token/introspection server (threads in this process), a throw-away test CA and a
  private Dovecot (``tests.support``), with one mailbox of ``--messages`` messages of about
  ``--size`` bytes each (headers, a text part and a base64 attachment);
* the proxy as a **separate process**, through its real command line: ``token import
  --no-verify`` (refresh token and local password on stdin), then ``run --config <toml>``.
  A separate process because the machine has 2 cores: inside one event loop the client's own
  CPU would compete with the proxy's and the measurement would mostly show the client. As a
  process of its own the proxy gets its own core, its CPU time can be read from /proc, and it
  runs exactly as deployed.

The client is a small blocking-socket IMAP reader (1 MiB ``recv_into``, literal-aware, counts
bytes without copying them) so that it costs little next to what it measures.

Measured, against the same Dovecot:

1. Bulk FETCH: one connection per round, ``FETCH 1:* (BODY.PEEK[])`` of the whole mailbox, timed
   from sending the command to the tagged OK, untimed warm-up round first, paths alternated.

   * ``proxy``:  client --plain loopback--> proxy --TLS--> Dovecot imaps (LOGIN, local password)
   * ``proxy-tls``: client --TLS--> the proxy's implicit-TLS listener (its own CA, from
     ``mailproxy tls export-ca``) --TLS--> Dovecot imaps: the proxy decrypts and encrypts.
   * ``direct``: client --TLS--> Dovecot imaps (AUTHENTICATE XOAUTH2 with an access token)
   * ``direct-plain`` (reference only): client --plain--> Dovecot's imap port, no TLS anywhere.

   The headline ratio is proxy/direct, both end to end as the client sees them. TLS decryption
   happens in the client on the direct path but in the proxy on the proxy path; the CPU columns
   show where it went (proxy process from /proc/<pid>/stat, Dovecot = its master's children,
   client = this process).

2. Login latency with a cached token: ``--logins`` sequential logins per path, alternating:
   connect, greeting, login, tagged OK (timed), then LOGOUT and close (untimed), and a pause
   of ``--gap`` ms before the next login (a spare being made after one login must not compete
   with the next path's timed login). The direct path does its TLS handshake (no session
   resumption, like the proxy); the proxy path's client connects in plain text and the proxy
   does the TLS handshake upstream. The proxy runs as configured by default, with a spare
   upstream session ready for the account's next login (``[imap] spare_sessions = 1``: the
   verdicts are on these), and a second proxy process with ``spare_sessions = 0`` is measured
   in the same rounds (``proxy-nospare``, ``proxy-tls-nospare``): what a login costs when no
   spare is ready (the first login of an account, or one after ``spare_idle``).

Goals: proxy throughput >= 0.9 x direct, proxy login p50 <= direct p50 + 5 ms; over the
implicit-TLS listener >= 0.8 x direct and login p50 <= direct p50 + 3 ms (issue 11). The
verdicts are printed as PASS/MISS; the exit status is 0 unless something failed (1) or Ctrl-C (130).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import random
import re
import socket
import ssl
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from common import (  # the repository root goes on sys.path here
    CLK_TCK,
    ImapServers,
    client_socket,
    export_proxy_ca,
    launch_proxy,
    machine_busy,
    proc_cpu,
    progress,
    run,
    stop_proxy,
)

from tests.support.dovecot import Dovecot, dovecot_available
from tests.support.servers import free_port
from tests.support.tlsca import TestCA, make_test_ca
from tests.support.tokenserver import (
    TEST_CLIENT_ID,
    TEST_CLIENT_SECRET,
    TokenServer,
)

USER = "bench@example.test"
LOCAL_PASSWORD = "bench local password"
TIMEOUT = 60.0
THROUGHPUT_GOAL = 0.9
LOGIN_GOAL_MS = 5.0
TLS_THROUGHPUT_GOAL = 0.8
TLS_LOGIN_GOAL_MS = 3.0
_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
_PROXY_LOGIN_LOG = re.compile(
    rb"imap login for \S+ from \S+ via \S+( \(spare\))? in ([\d.]+) ms")




# ------------------------------------------------------------------------------- the client


class ImapError(RuntimeError):
    pass


@dataclass
class Response:
    wire_bytes: int  # everything received for this response
    literal_bytes: int
    literals: int
    text: bytes  # the whole response if kept, else the tagged line only

    @property
    def tagged(self) -> bytes:
        return self.text.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]


class FastImap:
    """Blocking IMAP client: big reads, literal-aware, the payload is counted, not copied."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(1 << 20)
        self.view = memoryview(self.buf)
        self.pending = b""
        self.seq = 0

    @classmethod
    def connect(cls, port: int, context: ssl.SSLContext | None = None) -> tuple[FastImap, bytes]:
        client = cls(client_socket(port, context, TIMEOUT))
        greeting = client.read_response(None, keep=True).text
        if not greeting.startswith(b"* OK"):
            client.close()
            raise ImapError(f"unexpected greeting {greeting!r}")
        return client, greeting

    def read_response(self, tag: bytes | None, keep: bool = False) -> Response:
        """Up to the tagged line for ``tag`` (``None``: the first line), literals skipped."""
        prefix = b"" if tag is None else tag + b" "
        line = bytearray()
        out = bytearray()
        skip = 0
        continued = False  # the current line continues a line that had a literal
        wire = lit_bytes = lits = 0
        while True:
            if self.pending:
                chunk: bytes | bytearray = self.pending
                n = len(chunk)
                self.pending = b""
            else:
                n = self.sock.recv_into(self.view)
                if n == 0:
                    raise ImapError(f"connection closed while waiting for {tag!r}")
                chunk = self.buf
            i = 0
            while i < n:
                if skip:
                    take = min(skip, n - i)
                    if keep:
                        out += chunk[i:i + take]
                    skip -= take
                    i += take
                    continue
                j = chunk.find(b"\n", i, n)
                if j < 0:
                    line += chunk[i:n]
                    i = n
                    break
                line += chunk[i:j + 1]
                i = j + 1
                if keep:
                    out += line
                match = _LITERAL.search(line) if line.endswith(b"}\r\n") else None
                if match is not None:
                    skip = int(match.group(1))
                    lits += 1
                    lit_bytes += skip
                    continued = True
                elif not continued and line.startswith(prefix):
                    wire += i
                    self.pending = bytes(chunk[i:n])
                    return Response(wire, lit_bytes, lits, bytes(out) if keep else bytes(line))
                else:
                    continued = False
                line = bytearray()
            wire += n

    def command(self, text: str, keep: bool = True, check: bool = True) -> Response:
        self.seq += 1
        tag = f"b{self.seq}".encode()
        self.sock.sendall(tag + b" " + text.encode() + b"\r\n")
        response = self.read_response(tag, keep=keep)
        if check and not response.tagged.startswith(tag + b" OK"):
            raise ImapError(f"{text.split()[0]} failed: {response.tagged!r}")
        return response

    def logout(self) -> None:
        with contextlib.suppress(OSError, ImapError):
            self.command("LOGOUT", check=False)
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# ------------------------------------------------------------------------ the environment


def imap_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_message(index: int, size: int, rng: random.Random) -> bytes:
    """A CRLF message of about ``size`` bytes: headers, a text part, a base64 attachment."""
    boundary = f"=_bench_{index:06d}_{rng.getrandbits(32):08x}"
    words = ("mail proxy token refresh upstream server client mailbox message folder "
             "quarterly report meeting budget draft review attached please regards").split()
    text_lines = []
    for _ in range(24):
        text_lines.append(" ".join(rng.choice(words) for _ in range(11)).capitalize() + ".")
    head = (
        f"Return-Path: <sender{index % 17}@example.org>\r\n"
        f"Received: from mx{index % 3}.example.org (mx.example.org [192.0.2.{index % 250}])\r\n"
        f"\tby mail.example.test with ESMTPS id {rng.getrandbits(64):016x}\r\n"
        f"\tfor <{USER}>; Mon, 3 Jun 2024 10:{index % 60:02d}:00 +0000\r\n"
        f"From: Sender {index % 17} <sender{index % 17}@example.org>\r\n"
        f"To: Bench User <{USER}>\r\n"
        f"Subject: Benchmark message {index} with a report attached\r\n"
        f"Date: Mon, 3 Jun 2024 10:{index % 60:02d}:00 +0000\r\n"
        f"Message-ID: <bench.{index}.{rng.getrandbits(48):012x}@example.org>\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n" + "\r\n".join(text_lines) + "\r\n\r\n"
        f"--{boundary}\r\n"
        f'Content-Type: application/pdf; name="report-{index}.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="report-{index}.pdf"\r\n'
        "\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    room = max(0, size - len(head) - len(tail))
    # base64 lines of 76 characters + CRLF carry 57 bytes each.
    raw = rng.randbytes(max(57, room * 57 // 78))
    body = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    return head + body[:room].rstrip(b"\r\n") + tail




def children_cpu(parent: int) -> float:
    """CPU seconds of the live children of ``parent`` (Dovecot's master: imap, imap-login...)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total






class Environment(ImapServers):
    def __init__(self, messages: int, size: int) -> None:
        super().__init__("mailproxy-bench-")
        self.messages = messages
        self.size = size
        self.token_server: TokenServer | None = None
        self.dovecot: Dovecot | None = None
        self.proxy_port = 0
        self.proxy_tls_port = 0
        self.proxy_tls: ssl.SSLContext | None = None
        # The second proxy, [imap] spare_sessions = 0: its ports, CA and log.
        self.nospare: subprocess.Popen[bytes] | None = None
        self.nospare_port = 0
        self.nospare_tls_port = 0
        self.nospare_tls: ssl.SSLContext | None = None
        self.nospare_log = self.tmp / "nospare" / "proxy.log"
        self.ca: TestCA | None = None
        self.tls: ssl.SSLContext | None = None
        self.mailbox_bytes = 0

    # -- setup ---------------------------------------------------------------------------

    def start(self) -> None:
        ok, reason = dovecot_available()
        if not ok:
            raise RuntimeError(reason)
        self.ca = make_test_ca(self.tmp / "ca")
        self.tls = ssl.create_default_context(cafile=str(self.ca.ca_cert))
        self.token_server = TokenServer()
        self.token_server.authority.register_client(TEST_CLIENT_ID, TEST_CLIENT_SECRET)
        self.dovecot = Dovecot(self.tmp / "dovecot", self.ca,
                               self.token_server.introspection_url)
        progress(f"filling the mailbox: {self.messages} messages of ~{self.size} bytes")
        rng = random.Random(1234)
        for i in range(self.messages):
            message = make_message(i, self.size, rng)
            self.mailbox_bytes += len(message)
            self.dovecot.deliver(USER, message)
        progress("starting Dovecot")
        self.dovecot.start()
        self._start_proxy()

    def _start_proxy(self) -> None:
        assert self.dovecot is not None and self.token_server is not None and self.ca
        self.proxy_port = free_port()
        self.proxy_tls_port = free_port()
        self.proxy = launch_proxy(
            self.tmp, "imap", self.proxy_port, USER, LOCAL_PASSWORD, self.token_server,
            self.ca.ca_cert, {"imap_server": f'"127.0.0.1:{self.dovecot.imaps_port}"',
                              "imap_tls": '"implicit"'},
            {"tls_listen": f'"127.0.0.1:{self.proxy_tls_port}"'})
        # Trust the proxy's own CA, as a client would after `mailproxy tls export-ca`.
        self.proxy_tls = ssl.create_default_context(cafile=str(export_proxy_ca(self.tmp)))
        other = self.tmp / "nospare"  # its own state directory, CA and log
        other.mkdir()
        self.nospare_port = free_port()
        self.nospare_tls_port = free_port()
        self.nospare = launch_proxy(
            other, "imap", self.nospare_port, USER, LOCAL_PASSWORD, self.token_server,
            self.ca.ca_cert, {"imap_server": f'"127.0.0.1:{self.dovecot.imaps_port}"',
                              "imap_tls": '"implicit"'},
            {"tls_listen": f'"127.0.0.1:{self.nospare_tls_port}"', "spare_sessions": "0"})
        self.nospare_tls = ssl.create_default_context(cafile=str(export_proxy_ca(other)))

    def stop(self) -> None:
        if self.nospare is not None:
            proc, self.nospare = self.nospare, None
            stop_proxy(proc)
        super().stop()

    # -- clients -------------------------------------------------------------------------

    def access_token(self) -> str:
        assert self.token_server is not None
        return self.token_server.authority.issue_access_token(USER)

    def login(self, path: str, token: str) -> FastImap:
        """A logged-in client on ``path`` (proxy, direct, direct-plain)."""
        assert self.dovecot is not None
        if path.startswith("proxy"):
            client, _ = FastImap.connect(*{
                "proxy": (self.proxy_port, None),
                "proxy-tls": (self.proxy_tls_port, self.proxy_tls),
                "proxy-nospare": (self.nospare_port, None),
                "proxy-tls-nospare": (self.nospare_tls_port, self.nospare_tls)}[path])
            client.command(f"LOGIN {imap_quote(USER)} {imap_quote(LOCAL_PASSWORD)}")
            return client
        if path == "direct":
            client, _ = FastImap.connect(self.dovecot.imaps_port, self.tls)
        else:
            client, _ = FastImap.connect(self.dovecot.imap_port)
        sasl = base64.b64encode(f"user={USER}\x01auth=Bearer {token}\x01\x01".encode())
        client.command(f"AUTHENTICATE XOAUTH2 {sasl.decode()}")
        return client

    def proxy_log_offsets(self) -> tuple[int, int]:
        return self.proxy_log.stat().st_size, self.nospare_log.stat().st_size

    def proxy_login_times(self, offsets: tuple[int, int]) -> dict[str, list[float]]:
        """The daemons' own "imap login ... in N ms" since ``offsets``: the default proxy's
        logins that took a spare and those that did not, and the second proxy's."""
        out: dict[str, list[float]] = {"spare": [], "no spare": [], "nospare proxy": []}
        for log, offset, spare_proxy in ((self.proxy_log, offsets[0], True),
                                         (self.nospare_log, offsets[1], False)):
            with log.open("rb") as f:
                f.seek(offset)
                for m in _PROXY_LOGIN_LOG.finditer(f.read()):
                    key = "nospare proxy" if not spare_proxy \
                        else "spare" if m.group(1) else "no spare"
                    out[key].append(float(m.group(2)))
        return out


# -------------------------------------------------------------------------- measurements


@dataclass
class FetchSample:
    seconds: float
    wire_bytes: int
    literal_bytes: int
    client_cpu: float
    dovecot_cpu: float
    proxy_cpu: float | None
    machine_busy: float  # fraction of all CPUs

    @property
    def mb_s(self) -> float:
        return self.wire_bytes / self.seconds / 1e6


@dataclass
class FetchResult:
    samples: dict[str, list[FetchSample]] = field(default_factory=dict)


def fetch_once(env: Environment, path: str, token: str) -> FetchSample:
    assert env.dovecot is not None and env.dovecot._proc is not None
    client = env.login(path, token)
    try:
        selected = client.command("SELECT INBOX").text
        exists = re.search(rb"\* (\d+) EXISTS", selected)
        if exists is None or int(exists.group(1)) != env.messages:
            raise ImapError(f"SELECT INBOX: expected {env.messages} messages: {selected!r}")
        dovecot_pid = env.dovecot._proc.pid
        proxy_pid = env.proxy.pid if env.proxy is not None else None
        c0, d0 = time.process_time(), children_cpu(dovecot_pid)
        p0 = proc_cpu(proxy_pid) if path.startswith("proxy") and proxy_pid else None
        b0 = machine_busy()
        t0 = time.perf_counter()
        response = client.command("FETCH 1:* (BODY.PEEK[])", keep=False)
        t1 = time.perf_counter()
        b1 = machine_busy()
        p1 = proc_cpu(proxy_pid) if p0 is not None and proxy_pid else None
        c1, d1 = time.process_time(), children_cpu(dovecot_pid)
    finally:
        client.logout()
    if response.literals != env.messages or response.literal_bytes != env.mailbox_bytes:
        raise ImapError(f"{path}: FETCH returned {response.literals} literals, "
                        f"{response.literal_bytes} bytes; expected {env.messages}, "
                        f"{env.mailbox_bytes}")
    busy = (b1[0] - b0[0]) / max(1, b1[1] - b0[1])
    return FetchSample(t1 - t0, response.wire_bytes, response.literal_bytes, c1 - c0, d1 - d0,
                       None if p0 is None or p1 is None else p1 - p0, busy)


def measure_fetch(env: Environment, rounds: int, paths: list[str]) -> FetchResult:
    token = env.access_token()
    result = FetchResult({p: [] for p in paths})
    progress("bulk FETCH: warm-up round")
    for path in paths:
        fetch_once(env, path, token)
    for r in range(rounds):
        order = paths if r % 2 == 0 else list(reversed(paths))
        for path in order:
            result.samples[path].append(fetch_once(env, path, token))
        line = ", ".join(f"{p} {result.samples[p][-1].mb_s:.0f}" for p in paths)
        progress(f"bulk FETCH round {r + 1}/{rounds}: {line} MB/s")
    return result


LOGIN_PATHS = ("proxy", "direct", "proxy-tls", "proxy-nospare", "proxy-tls-nospare")


def timed_login(env: Environment, path: str, token: str, gap: float = 0.0) -> float:
    t0 = time.perf_counter()
    client = env.login(path, token)
    elapsed = time.perf_counter() - t0
    client.logout()
    time.sleep(gap)
    return elapsed * 1000


def measure_logins(env: Environment, count: int, gap: float
                   ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    token = env.access_token()
    progress("logins: warm-up (the first proxy login runs scrypt and fetches a token)")
    for _ in range(10):
        for path in LOGIN_PATHS:
            timed_login(env, path, token, gap)
    offsets = env.proxy_log_offsets()
    times: dict[str, list[float]] = {path: [] for path in LOGIN_PATHS}
    for i in range(count):
        order = LOGIN_PATHS if i % 2 == 0 else tuple(reversed(LOGIN_PATHS))
        for path in order:
            times[path].append(timed_login(env, path, token, gap))
    time.sleep(0.2)  # let the proxy's log lines reach the file
    return times, env.proxy_login_times(offsets)


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return {"p50": v, "p90": v, "p99": v, "mean": v}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98], "mean": statistics.fmean(values)}


# ------------------------------------------------------------------------------ reporting


def summarize(env: Environment, fetch: FetchResult, logins: dict[str, list[float]],
              proxy_internal: dict[str, list[float]], args: argparse.Namespace
              ) -> dict[str, Any]:
    out: dict[str, Any] = {
        "config": {"messages": args.messages, "size": args.size, "rounds": args.rounds,
                   "logins": args.logins, "gap_ms": args.gap,
                   "mailbox_bytes": env.mailbox_bytes,
                   "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "fetch": {}, "login_ms": {},
    }
    for path, samples in fetch.samples.items():
        gb = sum(s.wire_bytes for s in samples) / 1e9
        entry: dict[str, Any] = {
            "mb_s": [round(s.mb_s, 1) for s in samples],
            "median_mb_s": statistics.median(s.mb_s for s in samples),
            "client_cpu_s_per_gb": sum(s.client_cpu for s in samples) / gb,
            "dovecot_cpu_s_per_gb": sum(s.dovecot_cpu for s in samples) / gb,
            "machine_busy": statistics.median(s.machine_busy for s in samples),
        }
        if all(s.proxy_cpu is not None for s in samples):
            entry["proxy_cpu_s_per_gb"] = sum(s.proxy_cpu or 0.0 for s in samples) / gb
            entry["proxy_cpu_per_wall"] = statistics.median(
                (s.proxy_cpu or 0.0) / s.seconds for s in samples)
        out["fetch"][path] = entry
    ratio = out["fetch"]["proxy"]["median_mb_s"] / out["fetch"]["direct"]["median_mb_s"]
    out["fetch"]["ratio_proxy_direct"] = ratio
    # Same round, back to back: less sensitive to drift than the ratio of the medians.
    out["fetch"]["paired_ratio_median"] = statistics.median(
        p.mb_s / d.mb_s for p, d in zip(fetch.samples["proxy"], fetch.samples["direct"],
                                        strict=True))
    out["fetch"]["goal"] = THROUGHPUT_GOAL
    out["fetch"]["verdict"] = "PASS" if ratio >= THROUGHPUT_GOAL else "MISS"
    for path, values in logins.items():
        out["login_ms"][path] = percentiles(values)
    for name, values in proxy_internal.items():
        if values:
            out["login_ms"][f"proxy's log, {name}"] = percentiles(values)
    out["login_ms"]["spare_hits"] = len(proxy_internal["spare"])
    out["login_ms"]["spare_misses"] = len(proxy_internal["no spare"])
    diff = out["login_ms"]["proxy"]["p50"] - out["login_ms"]["direct"]["p50"]
    out["login_ms"]["p50_diff_proxy_minus_direct"] = diff
    out["login_ms"]["goal_ms"] = LOGIN_GOAL_MS
    out["login_ms"]["verdict"] = "PASS" if diff <= LOGIN_GOAL_MS else "MISS"
    if "proxy-tls" in out["fetch"]:
        tls_ratio = out["fetch"]["proxy-tls"]["median_mb_s"] / out["fetch"]["direct"]["median_mb_s"]
        out["fetch"]["ratio_proxy_tls_direct"] = tls_ratio
        out["fetch"]["tls_verdict"] = "PASS" if tls_ratio >= TLS_THROUGHPUT_GOAL else "MISS"
    if "proxy-tls" in out["login_ms"]:
        tls_diff = out["login_ms"]["proxy-tls"]["p50"] - out["login_ms"]["direct"]["p50"]
        out["login_ms"]["p50_diff_proxy_tls_minus_direct"] = tls_diff
        out["login_ms"]["tls_verdict"] = "PASS" if tls_diff <= TLS_LOGIN_GOAL_MS else "MISS"
    for path in ("proxy-nospare", "proxy-tls-nospare"):
        if path in out["login_ms"]:
            out["login_ms"][f"p50_diff_{path}_minus_direct"] = \
                out["login_ms"][path]["p50"] - out["login_ms"]["direct"]["p50"]
    return out


def print_report(r: dict[str, Any]) -> None:
    c = r["config"]
    print(f"\nmailproxy IMAP benchmark: {c['messages']} messages, "
          f"{c['mailbox_bytes'] / 1e6:.1f} MB mailbox, {c['rounds']} rounds, "
          f"{c['logins']} logins per path, {c['cpus']} CPUs, Python {c['python']}")
    print("\n1. Bulk FETCH 1:* (BODY.PEEK[]), one connection (MB = 10^6 bytes)")
    print(f"  {'path':<13}{'median MB/s':>12}{'min':>8}{'max':>8}  "
          f"{'CPU s/GB: client':>16}{'proxy':>7}{'dovecot':>9}{'machine busy':>14}")
    for path in ("proxy", "proxy-tls", "direct", "direct-plain"):
        f = r["fetch"].get(path)
        if f is None:
            continue
        proxy_cpu = f"{f['proxy_cpu_s_per_gb']:.2f}" if "proxy_cpu_s_per_gb" in f else "-"
        print(f"  {path:<13}{f['median_mb_s']:>12.0f}{min(f['mb_s']):>8.0f}{max(f['mb_s']):>8.0f}"
              f"  {f['client_cpu_s_per_gb']:>16.2f}{proxy_cpu:>7}"
              f"{f['dovecot_cpu_s_per_gb']:>9.2f}{f['machine_busy'] * 100:>13.0f}%")
    f = r["fetch"]
    print("  proxy:  client --plain--> proxy --TLS--> Dovecot imaps (the proxy decrypts)")
    print("  direct: client --TLS--> Dovecot imaps (the client decrypts)")
    if "direct-plain" in f:
        print("  direct-plain: client --plain--> Dovecot imap, no TLS (reference, not a goal)")
    print(f"  proxy used {f['proxy']['proxy_cpu_per_wall'] * 100:.0f}% of a core while relaying,"
          f" {f['proxy']['proxy_cpu_s_per_gb']:.2f} CPU s per GB relayed")
    print(f"  ratio proxy/direct = {f['ratio_proxy_direct']:.3f}  "
          f"(goal >= {f['goal']})  {f['verdict']}   "
          f"[median of per-round ratios: {f['paired_ratio_median']:.3f}]")
    if "ratio_proxy_tls_direct" in f:
        print(f"  proxy-tls: client --TLS--> proxy's TLS listener --TLS--> Dovecot imaps; proxy "
              f"{f['proxy-tls']['proxy_cpu_s_per_gb']:.2f} CPU s per GB; ratio proxy-tls/direct "
              f"= {f['ratio_proxy_tls_direct']:.3f} (goal >= {TLS_THROUGHPUT_GOAL})  "
              f"{f['tls_verdict']}")
    lm = r["login_ms"]
    print("\n2. Login latency, cached token: connect + greeting + login until tagged OK (ms)")
    print(f"  {'path':<28}{'p50':>8}{'p90':>8}{'p99':>8}{'mean':>8}")
    for path, label in (("proxy", "proxy (LOGIN)"), ("proxy-tls", "proxy TLS (LOGIN)"),
                        ("proxy-nospare", "proxy, no spare"),
                        ("proxy-tls-nospare", "proxy TLS, no spare"),
                        ("direct", "direct (XOAUTH2)"),
                        ("proxy's log, spare", "proxy's log, spare taken"),
                        ("proxy's log, no spare", "proxy's log, none ready"),
                        ("proxy's log, nospare proxy", "no-spare proxy's log")):
        if path in lm:
            p = lm[path]
            print(f"  {label:<28}{p['p50']:>8.2f}{p['p90']:>8.2f}{p['p99']:>8.2f}"
                  f"{p['mean']:>8.2f}")
    print("  direct includes its TLS handshake; through the proxy the client connects in plain")
    print("  text and the proxy does the TLS handshake and XOAUTH2 upstream.")
    print("  \"proxy's log\": the daemon's 'imap login ... in N ms' (password check to "
          "upstream OK)")
    print(f"  the default proxy ([imap] spare_sessions = 1) took a spare in "
          f"{lm['spare_hits']} of {lm['spare_hits'] + lm['spare_misses']} timed logins; the "
          f"no-spare proxy is a second process with spare_sessions = 0; {c['gap_ms']:.0f} ms "
          "between logins")
    nospare = lm.get("p50_diff_proxy-nospare_minus_direct")
    print(f"  p50 difference proxy - direct = {lm['p50_diff_proxy_minus_direct']:+.2f} ms  "
          f"(goal <= {lm['goal_ms']:.0f} ms)  {lm['verdict']}"
          + (f"   [no spare: {nospare:+.2f} ms]" if nospare is not None else ""))
    if "p50_diff_proxy_tls_minus_direct" in lm:
        nospare = lm.get("p50_diff_proxy-tls-nospare_minus_direct")
        print(f"  p50 difference proxy-tls - direct = "
              f"{lm['p50_diff_proxy_tls_minus_direct']:+.2f} ms (both with a TLS handshake; "
              f"goal <= {TLS_LOGIN_GOAL_MS:.0f} ms)  {lm['tls_verdict']}"
              + (f"   [no spare: {nospare:+.2f} ms]" if nospare is not None else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--size", type=int, default=100 * 1024, help="bytes per message")
    parser.add_argument("--rounds", type=int, default=15, help="timed bulk FETCH rounds per path")
    parser.add_argument("--logins", type=int, default=200, help="timed logins per path")
    parser.add_argument("--gap", type=float, default=30.0,
                        help="ms between two timed logins (untimed)")
    parser.add_argument("--no-plain", action="store_true",
                        help="skip the direct-plain reference (no TLS) in the FETCH test")
    parser.add_argument("--keep", action="store_true",
                        help="pause before cleaning up (prints the temporary directory)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = parser.parse_args()
    if args.messages < 1 or args.size < 1024 or args.rounds < 1 or args.logins < 1:
        parser.error("--messages, --rounds, --logins must be >= 1 and --size >= 1024")

    env = Environment(args.messages, args.size)

    def measure() -> dict[str, Any]:
        paths = ["proxy", "proxy-tls", "direct"] + ([] if args.no_plain else ["direct-plain"])
        fetch = measure_fetch(env, args.rounds, paths)
        logins, internal = measure_logins(env, args.logins, args.gap / 1000)
        return summarize(env, fetch, logins, internal, args)

    return run(env, measure, args.keep, args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
