"""RSS per idle TLS connection and bulk TLS receive throughput, with asyncio's own read buffer
per connection and with ``proxy.tls.memory.share_tls_read_buffer``.

    python bench/tls_memory.py [--connections 300] [--bulk-mb 400] [--rounds 3]

A server process (this file with ``--serve``) accepts TLS on loopback with the context the
proxy builds (``proxy.tls.contexts``) and a ``net.Conn`` per connection; the parent process
sends ``--bulk-mb`` over one TLS connection (a blocking client) and times it, and the server's
CPU, until the server has counted every byte; then opens the idle connections (each does one
small exchange, like a greeting) and reads the server's RSS from /proc before, while they are
open, after they close and after ``release_free_memory``. Modes alternate, a fresh server each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common import rss_kib  # noqa: E402

from proxy.config import Settings  # noqa: E402
from proxy.net import Conn  # noqa: E402
from proxy.tls.certs import ensure_local_certificates, local_files, wanted_names  # noqa: E402
from proxy.tls.contexts import build_server_context  # noqa: E402


async def serve(state_dir: Path, shared: bool) -> None:
    if shared:
        from proxy.tls.memory import share_tls_read_buffer
        assert share_tls_read_buffer()
    context = build_server_context(local_files(state_dir).pairs(), "1.2")
    conns: set[Conn] = set()

    async def handle(conn: Conn) -> None:
        await conn.connected
        try:
            first = await conn.recv()
            if first.startswith(b"TRIM"):
                from proxy.tls.memory import release_free_memory
                conn.write(b"%d\n" % release_free_memory())
                await conn.closed
            elif first.startswith(b"BULK "):
                header, _, rest = first.partition(b"\n")
                want, total = int(header.split()[1]), len(rest)
                while total < want and (data := await conn.recv()):
                    total += len(data)
                conn.write(f"{total}\n".encode())
                await conn.closed
            else:
                conn.write(b"* OK hello\r\n")
                await conn.closed
        finally:
            conn.close()
            conns.discard(conn)

    tasks: set[asyncio.Task[None]] = set()

    def factory() -> Conn:
        conn = Conn()
        conns.add(conn)
        task = asyncio.get_running_loop().create_task(handle(conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return conn

    server = await asyncio.get_running_loop().create_server(
        factory, "127.0.0.1", 0, ssl=context, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until closed
    server.close()


async def measure(state_dir: Path, shared: bool, connections: int, bulk_mb: int
                  ) -> dict[str, float]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(state_dir)] + (["--shared"] if shared else []),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(proc.stdout.readline())
        client = ssl.create_default_context(cafile=str(local_files(state_dir).ca_cert))
        await asyncio.sleep(0.3)
        # Bulk first, while the server's heap is as fresh in both modes.
        cpu0 = _cpu(proc.pid)
        elapsed = await asyncio.to_thread(_bulk, port, client, bulk_mb)
        cpu = _cpu(proc.pid) - cpu0
        await asyncio.sleep(0.3)
        base = rss_kib(proc.pid)
        streams = []
        for _ in range(connections):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                          server_hostname="localhost")
            writer.write(b"a1 CAPABILITY\r\n")
            await reader.readline()
            streams.append((reader, writer))
        await asyncio.sleep(0.5)
        held = rss_kib(proc.pid)
        for _, writer in streams:
            writer.close()
        for _, writer in streams:
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        await asyncio.sleep(1.0)
        after = rss_kib(proc.pid)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                      server_hostname="localhost")
        writer.write(b"TRIM\n")
        await reader.readline()
        trimmed = rss_kib(proc.pid)
        writer.close()
        return {"rss_start_kib": base, "rss_held_kib": held, "rss_after_kib": after,
                "rss_trimmed_kib": trimmed,
                "kib_per_conn": (held - base) / connections,
                "bulk_mb_per_s": bulk_mb / elapsed,
                "server_cpu_s_per_gb": cpu / (bulk_mb / 1024)}
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=10)


def _bulk(port: int, client: ssl.SSLContext, megabytes: int) -> float:
    """Send ``megabytes`` MiB over one TLS connection (a blocking socket: the client must not
    be what limits the rate); seconds until the server has counted them all."""
    chunk = b"x" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            client.wrap_socket(raw, server_hostname="localhost") as sock:
        start = time.perf_counter()
        sock.sendall(f"BULK {megabytes << 20}\n".encode())
        for _ in range(megabytes):
            sock.sendall(chunk)
        counted = int(sock.makefile("rb").readline())
        elapsed = time.perf_counter() - start
    assert counted == megabytes << 20, counted
    return elapsed


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--bulk-mb", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", metavar="STATE_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--shared", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(Path(args.serve), args.shared))
        return
    from proxy.tls.memory import raise_open_file_limit
    raise_open_file_limit()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        ensure_local_certificates(state, wanted_names(Settings(state_dir=state).tls.names),
                                  dt.datetime.now(dt.UTC))
        results: dict[str, list[dict[str, float]]] = {"default": [], "shared": []}
        for _ in range(args.rounds):
            for mode in ("default", "shared"):
                results[mode].append(asyncio.run(
                    measure(state, mode == "shared", args.connections, args.bulk_mb)))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for mode, runs in results.items():
        for r in runs:
            print(f"{mode:8} start {r['rss_start_kib']/1024:6.1f} MiB  held "
                  f"{r['rss_held_kib']/1024:6.1f} MiB  ({r['kib_per_conn']:5.1f} KiB/conn)  "
                  f"after close {r['rss_after_kib']/1024:6.1f} MiB, trimmed "
                  f"{r['rss_trimmed_kib']/1024:6.1f} MiB  bulk "
                  f"{r['bulk_mb_per_s']:6.1f} MB/s, server CPU "
                  f"{r['server_cpu_s_per_gb']:.2f} s/GB")


if __name__ == "__main__":
    main()
