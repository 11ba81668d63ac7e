"""A short run of bench/fuzz.py against the real daemon: every pre-login dialogue (IMAP, POP3,
SMTP) with a few thousand generated and mutated inputs, and no finding allowed (no crash, no
traceback or control byte in the log, no malformed reply, no hang, no reset connection).

The seed is fixed so that a failure here reproduces with
``python bench/fuzz.py --seed 12 --protocols <p> --connection <n>`` (n: the connection the
failure names); MAILPROXY_FUZZ_SEED picks another one. Then STARTTLS (STLS) on each protocol,
with commands pipelined behind it and garbage in place of the handshake.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import fuzz  # noqa: E402

SEED = int(os.environ.get("MAILPROXY_FUZZ_SEED", "12"))


@pytest.fixture(scope="module")
def daemon() -> Iterator[fuzz.Daemon]:
    tmp = Path(tempfile.mkdtemp(prefix="mailproxy-fuzz-test-"))
    running = fuzz.Daemon(tmp)
    try:
        running.start()
        yield running
    finally:
        running.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("protocol", fuzz.PROTOCOLS)
def test_prelogin_dialogue_survives_fuzzing(daemon: fuzz.Daemon, protocol: str) -> None:
    summaries, smallest = asyncio.run(fuzz.fuzz(
        [protocol], inputs=8000, seconds=6, seed=SEED, connections=8, timeout=5.0,
        shrink_budget=2.0, daemon=daemon))
    summary = summaries[0]
    assert summary["inputs"] >= 500, summary  # the run did fuzz something
    found = {k: summary[k] for k in ("crashes", "hangs", "malformed", "rst", "log")}
    details = "\n".join(f"{f.kind} (connection {f.conn}): {f.detail}\n"
                        f"  input: {b''.join(f.script)[-500:]!r}" for f in smallest)
    assert found == dict.fromkeys(found, 0), f"{summary['findings']}\n{details}"


# STARTTLS (STLS), then commands pipelined behind it (and enough of them to fill the daemon's
# read buffer), then garbage instead of a TLS handshake.
_STARTTLS = {
    "imap": (b"a STARTTLS\r\nb LOGIN x y\r\n", b"a OK "),
    "pop3": (b"STLS\r\nUSER x\r\n", b"+OK "),
    "smtp": (b"EHLO x\r\nSTARTTLS\r\nAUTH PLAIN AHgAeQ==\r\n", b"220 2.0.0 "),
}


@pytest.mark.parametrize("pipelined", [0, 70_000])
@pytest.mark.parametrize("protocol", fuzz.PROTOCOLS)
def test_starttls_then_garbage_closes_without_running_what_was_pipelined(
        daemon: fuzz.Daemon, protocol: str, pipelined: int) -> None:
    async def run() -> tuple[bytes, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.ports[protocol])
        try:
            await reader.readline()
            command, go_ahead = _STARTTLS[protocol]
            writer.write(command + b"NOOP " * (pipelined // 5) + b"\r\n")
            before = b""
            async with asyncio.timeout(10):
                while not before.endswith(b"\r\n") or go_ahead not in before:
                    chunk = await reader.read(65536)
                    assert chunk, before
                    before += chunk
            writer.write(b"NOOP\r\nnot a TLS handshake\r\n")
            async with asyncio.timeout(5):
                return before, await reader.read()  # nothing more, and closed at once
        finally:
            writer.close()

    before, after = asyncio.run(run())
    last = before.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
    assert last.startswith(_STARTTLS[protocol][1]), before  # the go-ahead came last
    assert after == b"", after
    assert daemon.new_log_problems() == []
