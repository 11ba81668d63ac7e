"""What the benchmarks share: the proxy run as its own process through its CLI, /proc
readings of CPU time, concurrent senders timed together, rounds with the paths in alternating
order, and the run itself (start, measure, report, always clean up)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CLK_TCK = os.sysconf("SC_CLK_TCK")

M = TypeVar("M")
S = TypeVar("S")


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


def die_with_parent() -> None:
    # Linux: the proxy gets SIGTERM if the benchmark dies without cleaning up.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_proxy(config: Path, log_path: Path, port: int, user: str,
                secrets: dict[str, str]) -> subprocess.Popen[bytes]:
    """Provision ``user`` through the CLI (``token import --no-verify``: the refresh token and
    the local password on stdin), then ``mailproxy run`` and wait until ``port`` accepts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPROXY_")}
    env["PYTHONPATH"] = str(REPO)
    base = [sys.executable, "-m", "proxy"]
    done = subprocess.run(
        [*base, "token", "import", "--no-verify", "--config", str(config), user],
        input=f"{secrets['refresh_token']}\n{secrets['password']}\n".encode(),
        capture_output=True, env=env, cwd=REPO, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"mailproxy token import failed: "
                           f"{done.stderr.decode(errors='replace')}")
    progress(f"starting the proxy on 127.0.0.1:{port}")
    with log_path.open("wb") as log:
        proxy = subprocess.Popen(
            [*base, "run", "--config", str(config)], stdin=subprocess.DEVNULL,
            stdout=log, stderr=log, env=env, cwd=REPO, start_new_session=True,
            preexec_fn=die_with_parent)
    deadline = time.monotonic() + 30
    while True:
        if proxy.poll() is not None:
            raise RuntimeError(f"the proxy exited with {proxy.returncode}:\n"
                               f"{log_path.read_text(errors='replace')}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proxy
        if time.monotonic() > deadline:
            stop_proxy(proxy)
            raise RuntimeError("the proxy did not start listening within 30 s")
        time.sleep(0.05)


def stop_proxy(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid``, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def client_socket(port: int, context: ssl.SSLContext | None, timeout: float) -> socket.socket:
    """A connection to 127.0.0.1:``port``, Nagle off, over TLS when ``context`` is given."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if context is not None:
        try:
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        except BaseException:
            sock.close()
            raise
    return sock


def export_proxy_ca(tmp: Path) -> Path:
    """``mailproxy tls export-ca`` for the proxy configured in ``tmp``, written next to it:
    what a client trusts."""
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "tls", "export-ca", "--config",
         str(tmp / "mailproxy.toml")], capture_output=True, check=True, timeout=60, cwd=REPO)
    path = tmp / "proxy-ca.pem"
    path.write_bytes(out.stdout)
    return path


class ImapServers:
    """What an IMAP benchmark runs and stops: the test token server, Dovecot and the proxy,
    in a temporary directory removed at the end."""

    def __init__(self, prefix: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.tmp.chmod(0o755)  # Dovecot's unprivileged users traverse it
        self.token_server: Any = None
        self.dovecot: Any = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self.proxy_log = self.tmp / "proxy.log"

    def server_log_tail(self) -> str:
        return self.dovecot.log_tail() if self.dovecot is not None else ""

    def stop(self) -> None:
        if self.proxy is not None:
            proc, self.proxy = self.proxy, None
            stop_proxy(proc)
        if self.dovecot is not None:
            with contextlib.suppress(Exception):
                self.dovecot.stop()
        if self.token_server is not None:
            with contextlib.suppress(Exception):
                self.token_server.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class BenchEnvironment(Protocol):
    """What ``run`` needs of a benchmark's environment."""

    tmp: Path
    proxy: subprocess.Popen[bytes] | None
    proxy_log: Path

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def server_log_tail(self) -> str:
        """The mail server's log, for a failed run ("" if it never started)."""
        ...


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(env: BenchEnvironment, measure: Callable[[], dict[str, Any]], keep: bool,
        as_json: bool, report: Callable[[dict[str, Any]], None]) -> int:
    """Start ``env``, ``measure``, print the results (JSON or ``report``) and always clean up,
    after an error, Ctrl-C or SIGTERM too. The exit status: 0, 1 (error) or 130."""
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    try:
        env.start()
        results = measure()
        results["config"]["elapsed_s"] = round(time.monotonic() - started, 1)
        if keep:
            input(f"[bench] kept {env.tmp} (proxy pid {env.proxy and env.proxy.pid}); "
                  "press Enter to clean up ")
    except KeyboardInterrupt:
        progress("interrupted; cleaning up")
        return 130
    except Exception:
        traceback.print_exc()
        if env.proxy_log.exists():
            tail = env.proxy_log.read_text(errors="replace").splitlines()[-20:]
            print("proxy log (tail):\n" + "\n".join(tail), file=sys.stderr)
        server_log = env.server_log_tail()
        if server_log:
            print("server log (tail):\n" + server_log, file=sys.stderr)
        return 1
    finally:
        env.stop()
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        report(results)
        print(f"\n(total {results['config']['elapsed_s']} s)")
    return 0


def launch_proxy(tmp: Path, protocol: str, port: int, user: str, password: str,
                 token_server: Any, ca_file: Path, account: dict[str, str],
                 options: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Write ``tmp/mailproxy.toml`` for one ``custom`` account of the test token server, the
    ``protocol`` listener on ``port`` (the others on free ports: the defaults may be taken),
    and start the proxy with a fresh refresh token (see ``start_proxy``).

    ``account`` and ``options`` are TOML values written as given, for the account and the
    ``protocol`` section."""
    from tests.support.servers import free_port
    from tests.support.tokenserver import TEST_CLIENT_ID, TEST_CLIENT_SECRET

    lines = [f'state_dir = "{tmp / "state"}"', 'log_level = "info"']
    for name in ("imap", "pop3", "smtp"):
        own = (options or {}) if name == protocol else {}
        lines += [f"[{name}]", f'listen = "127.0.0.1:{port if name == protocol else free_port()}"']
        if "tls_listen" not in own:
            lines.append(f'tls_listen = "127.0.0.1:{free_port()}"')
        lines += [f"{key} = {value}" for key, value in own.items()]
    lines += ["[[accounts]]", f'address = "{user}"', 'provider = "custom"',
              f'client_id = "{TEST_CLIENT_ID}"', f'client_secret = "{TEST_CLIENT_SECRET}"',
              f'token_url = "{token_server.token_url}"', 'scopes = ["mail"]',
              *(f"{key} = {value}" for key, value in account.items()),
              f'ca_file = "{ca_file}"']
    config = tmp / "mailproxy.toml"
    config.write_text("\n".join(lines) + "\n")
    refresh_token = token_server.authority.issue_refresh_token(user, TEST_CLIENT_ID)
    return start_proxy(config, tmp / "proxy.log", port, user,
                       {"password": password, "refresh_token": refresh_token})


# ------------------------------------------------------------------ senders and rounds


SMALL = 10_000  # bytes of a "10 KB" message (MB = 10^6 bytes)
LARGE = 1_000_000


@dataclass
class Case:
    """``count`` messages of ``size`` bytes, shared by ``senders`` concurrent senders."""

    name: str
    size: int
    count: int
    senders: int


def case_arguments(parser: argparse.ArgumentParser, *, small: int, large: int,
                   rounds: int) -> None:
    """The SMTP benchmarks' options: how many messages of each size, senders, rounds, and
    --keep, --json."""
    parser.add_argument("--small", type=int, default=small, help="10 KB messages per sample")
    parser.add_argument("--large", type=int, default=large, help="1 MB messages per sample")
    parser.add_argument("--senders", type=int, default=10, help="concurrent senders")
    parser.add_argument("--rounds", type=int, default=rounds,
                        help="timed rounds per case and path")
    parser.add_argument("--keep", action="store_true",
                        help="pause before cleaning up (prints the temporary directory)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")


def cases_of(parser: argparse.ArgumentParser, args: argparse.Namespace, *,
             large_senders: bool) -> list[Case]:
    """10 KB from one sender and from --senders, 1 MB from one (``large_senders``: and from
    --senders too)."""
    if min(args.small, args.large, args.senders, args.rounds) < 1:
        parser.error("--small, --large, --senders, --rounds must be >= 1")
    cases = [Case("10 KB x1 sender", SMALL, args.small, 1),
             Case(f"10 KB x{args.senders} senders", SMALL, args.small, args.senders),
             Case("1 MB x1 sender", LARGE, args.large, 1)]
    if large_senders:
        cases.append(Case(f"1 MB x{args.senders} senders", LARGE, args.large, args.senders))
    return cases


def shares(count: int, senders: int) -> list[int]:
    """``count`` split over ``senders`` as evenly as it goes."""
    return [count // senders + (1 if i < count % senders else 0) for i in range(senders)]


@dataclass
class SenderRun(Generic[M]):
    start: float  # perf_counter when the senders were let go
    end: float  # when the last of them finished
    before: M  # meter() as they were let go
    after: M  # meter() once all had finished

    @property
    def seconds(self) -> float:
        return self.end - self.start


def run_senders(count: int, senders: int, prepare: Callable[[int], Callable[[], None]],
                meter: Callable[[], M], timeout: float, label: str) -> SenderRun[M]:
    """``count`` messages over ``senders`` threads, timed together. Each thread calls
    ``prepare(its share)`` untimed (a login, say) and waits for the others; then all run what
    ``prepare`` returned at once, and the timer runs until the last one is done. ``meter`` is
    read as they start and after (CPU counters). Raises the first error of a thread."""
    errors: list[BaseException] = []
    done_at: list[float] = []
    barrier = threading.Barrier(senders + 1, timeout=timeout)
    lock = threading.Lock()

    def sender(n: int) -> None:
        try:
            work = prepare(n)
            barrier.wait()
            work()
            with lock:
                done_at.append(time.perf_counter())
        except BaseException as exc:  # reported by the main thread
            with lock:
                errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=sender, args=(n,), daemon=True)
               for n in shares(count, senders)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    before = meter()
    start = time.perf_counter()
    deadline = time.monotonic() + 5 * timeout
    for t in threads:
        while t.is_alive():
            t.join(0.2)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: senders still running after {5 * timeout:.0f} s")
    after = meter()
    if errors:
        raise RuntimeError(f"{label}: {errors[0]!r}") from errors[0]
    return SenderRun(start, max(done_at), before, after)


def sample_rounds(case: Case, paths: Sequence[str], rounds: int,
                  sample: Callable[[str, int], S], rate: Callable[[S], float]
                  ) -> dict[str, list[S]]:
    """An untimed warm-up of every path (a few messages), then ``rounds`` rounds of every
    path in alternating order (neither always runs right after the other);
    ``sample(path, messages)`` takes one sample, ``rate`` says its msg/s for the progress."""
    progress(f"{case.name}: warm-up")
    for path in paths:
        sample(path, min(case.count, 2 * case.senders))
    out: dict[str, list[S]] = {path: [] for path in paths}
    for r in range(rounds):
        for path in (paths if r % 2 == 0 else tuple(reversed(paths))):
            out[path].append(sample(path, case.count))
        progress(f"{case.name} round {r + 1}/{rounds}: " + ", ".join(
            f"{path} {rate(out[path][-1]):.1f} msg/s" for path in paths))
    return out
