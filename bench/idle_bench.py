#!/usr/bin/env python3
"""Idle IMAP sessions through the proxy: RSS per session, all usable, RSS after they close.

    python bench/idle_bench.py [--sessions 1000] [--legs plain,tls] [--python-allocator]
                               [--json] [--keep]

One run, in a temporary directory it removes afterwards: the test token server, a test CA, a
private Dovecot whose limits are raised for many sessions (``mail_max_userip_connections``, an
imap process serving up to 100 clients and living on: ``service_count = 0``), and the proxy as
its own process through its CLI.
For each client leg in ``--legs`` (``plain``: the plain listener; ``tls``: the implicit-TLS
listener, trusting the proxy's CA from ``mailproxy tls export-ca``), the client (asyncio, with
the shared TLS read buffer itself, so that it stays small) opens ``--sessions`` sessions, each
one logged in (the proxy's upstream leg is TLS to Dovecot's imaps port), reads the proxy's
RSS from /proc, sends NOOP on every session and checks the answer, closes them all, and reads
the RSS again once the proxy has handed freed memory back (it does so within 5 s once a crowd
of sessions has ended and none is open: ``proxy/daemon/memory.py``). The proxy runs as
``mailproxy run`` does, with the C library's allocator; ``--python-allocator`` starts it with
``PYTHONMALLOC=pymalloc`` instead, to compare.

Goals (issue 11): at most 64 KB per session with a plaintext client leg, 128 KB over the TLS
listener, and back near the start-up figure after. Each session holds two descriptors in the
proxy, so the machine's 20,000 open files per process cap it near 9,900.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from common import ImapServers, export_proxy_ca, launch_proxy, progress, rss_kib, run

from proxy.tls.memory import raise_open_file_limit, share_tls_read_buffer
from tests.support.dovecot import Dovecot, dovecot_available
from tests.support.servers import free_port
from tests.support.tlsca import TestCA, make_test_ca
from tests.support.tokenserver import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TokenServer

USER = "idle@example.test"
LOCAL_PASSWORD = "bench local password"
GOALS_KB = {"plain": 64, "tls": 128}
CONCURRENCY = 50  # logins in flight at once
RELEASE_WAIT = 20.0  # the daemon releases freed memory within 5 s once the crowd has left


class ManyDovecot(Dovecot):
    """The test Dovecot with room for thousands of sessions of one user from one address."""

    def _config(self) -> str:
        text = super()._config()
        text = text.replace("mail_max_userip_connections = 1000",
                            "mail_max_userip_connections = 20000")
        return text.replace("service imap {\n  process_limit = 1024\n}",
                            "service imap {\n  process_limit = 1024\n  client_limit = 100\n"
                            "  service_count = 0\n}")


class Environment(ImapServers):
    def __init__(self) -> None:
        super().__init__("mailproxy-idle-")
        self.token_server: TokenServer | None = None
        self.dovecot: Dovecot | None = None
        self.ca: TestCA | None = None
        self.ports: dict[str, int] = {}

    def start(self) -> None:
        ok, reason = dovecot_available()
        if not ok:
            raise RuntimeError(reason)
        self.ca = make_test_ca(self.tmp / "ca")
        self.token_server = TokenServer()
        self.token_server.authority.register_client(TEST_CLIENT_ID, TEST_CLIENT_SECRET)
        self.dovecot = ManyDovecot(self.tmp / "dovecot", self.ca,
                                   self.token_server.introspection_url)
        progress("starting Dovecot")
        self.dovecot.start()
        self.ports = {"plain": free_port(), "tls": free_port()}
        self.proxy = launch_proxy(
            self.tmp, "imap", self.ports["plain"], USER, LOCAL_PASSWORD, self.token_server,
            self.ca.ca_cert, {"imap_server": f'"127.0.0.1:{self.dovecot.imaps_port}"',
                              "imap_tls": '"implicit"'},
            # One client address opens them all: no per-address (512) or total (1,000) cap.
            {"tls_listen": f'"127.0.0.1:{self.ports["tls"]}"', "max_connections": "0",
             "max_connections_per_ip": "0"})

    def proxy_ca(self) -> Path:
        return export_proxy_ca(self.tmp)


class Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def command(self, tag: str, text: str) -> bytes:
        self.writer.write(f"{tag} {text}\r\n".encode())
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line.startswith(tag.encode() + b" "):
                return line


async def open_session(port: int, context: ssl.SSLContext | None) -> Session:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost" if context else None,
        limit=8192)
    greeting = await reader.readline()
    if not greeting.startswith(b"* OK"):
        raise RuntimeError(f"greeting: {greeting!r}")
    session = Session(reader, writer)
    reply = await session.command("a", f'LOGIN "{USER}" "{LOCAL_PASSWORD}"')
    if not reply.startswith(b"a OK"):
        raise RuntimeError(f"login: {reply!r}")
    return session


async def measure_leg(env: Environment, leg: str, count: int) -> dict[str, Any]:
    assert env.proxy is not None
    pid = env.proxy.pid
    context = ssl.create_default_context(cafile=str(env.proxy_ca())) if leg == "tls" else None
    port = env.ports[leg]
    before = rss_kib(pid)
    sessions: list[Session] = []
    gate = asyncio.Semaphore(CONCURRENCY)
    started = time.monotonic()

    async def one() -> None:
        async with gate:
            sessions.append(await open_session(port, context))

    progress(f"{leg}: opening {count} sessions")
    await asyncio.gather(*(one() for _ in range(count)))
    opened_s = time.monotonic() - started
    await asyncio.sleep(3)
    held = rss_kib(pid)
    progress(f"{leg}: {count} open, proxy RSS {held / 1024:.1f} MiB; NOOP on each")
    replies = await asyncio.gather(*(s.command("n", "NOOP") for s in sessions),
                                   return_exceptions=True)
    usable = sum(1 for r in replies if isinstance(r, bytes) and r.startswith(b"n OK"))
    for s in sessions:
        s.writer.close()
    for s in sessions:
        with contextlib.suppress(OSError, ssl.SSLError):
            await s.writer.wait_closed()
    sessions.clear()
    progress(f"{leg}: closed; waiting {RELEASE_WAIT:.0f} s for the proxy to release memory")
    await asyncio.sleep(RELEASE_WAIT)
    after = rss_kib(pid)
    return {"sessions": count, "usable": usable, "open_s": round(opened_s, 1),
            "rss_before_kib": before, "rss_held_kib": held, "rss_after_kib": after,
            "kb_per_session": round((held - before) * 1.024 / count, 1)}


def report(results: dict[str, Any]) -> None:
    config = results["config"]
    print(f"Idle IMAP sessions through the proxy (upstream leg: TLS to Dovecot), "
          f"{config['sessions']} per client leg, allocator: {config['allocator']}")
    start = None
    for leg, r in results["legs"].items():
        start = r["rss_before_kib"] if start is None else start
        verdict = "PASS" if r["kb_per_session"] <= GOALS_KB[leg] else "MISS"
        print(f"  {leg:5} client leg: {r['kb_per_session']:6.1f} KB/session "
              f"(goal <= {GOALS_KB[leg]}: {verdict}); RSS {r['rss_before_kib'] / 1024:.1f} "
              f"-> {r['rss_held_kib'] / 1024:.1f} MiB held -> {r['rss_after_kib'] / 1024:.1f} "
              f"MiB after close; usable {r['usable']}/{r['sessions']}; opened in "
              f"{r['open_s']} s")
        took = r["rss_held_kib"] - r["rss_before_kib"]
        back = r["rss_held_kib"] - r["rss_after_kib"]
        print(f"        after close: {(r['rss_after_kib'] - start) / 1024:+.1f} MiB against "
              f"the start-up RSS ({start / 1024:.1f} MiB); {back / max(took, 1):.0%} of what "
              "the sessions took was given back")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--legs", default="plain,tls")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--python-allocator", action="store_true",
                        help="run the proxy with PYTHONMALLOC=pymalloc (to compare)")
    args = parser.parse_args()
    legs = [leg for leg in args.legs.split(",") if leg]
    if not legs or any(leg not in GOALS_KB for leg in legs) or args.sessions < 1:
        parser.error("--legs: plain and/or tls; --sessions >= 1")
    raise_open_file_limit()
    share_tls_read_buffer()  # the client's own TLS connections stay small too
    # The proxy inherits this process's environment (PYTHONMALLOC: what `run` restarts with).
    allocator = "pymalloc" if args.python_allocator else "malloc"
    if args.python_allocator:
        os.environ["PYTHONMALLOC"] = "pymalloc"
    else:
        os.environ.pop("PYTHONMALLOC", None)
    env = Environment()

    def measure() -> dict[str, Any]:
        out: dict[str, Any] = {"config": {"sessions": args.sessions, "allocator": allocator},
                               "legs": {}}
        for leg in legs:
            out["legs"][leg] = asyncio.run(measure_leg(env, leg, args.sessions))
        return out

    return run(env, measure, args.keep, args.json, report)


if __name__ == "__main__":
    sys.exit(main())
