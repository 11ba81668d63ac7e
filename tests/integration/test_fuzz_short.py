"""A short run of bench/fuzz.py against the real daemon: every pre-login dialogue (IMAP, POP3,
SMTP) with a few thousand generated and mutated inputs, and no finding allowed (no crash, no
traceback or control byte in the log, no malformed reply, no hang, no reset connection).

The seed is fixed so that a failure here reproduces with
``python bench/fuzz.py --seed 12 --inputs 8000 --protocols <p>``; MAILPROXY_FUZZ_SEED picks
another one.
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
    details = "\n".join(f"{f.kind}: {f.detail}\n  input: {b''.join(f.script)[-500:]!r}"
                        for f in smallest)
    assert found == dict.fromkeys(found, 0), f"{summary['findings']}\n{details}"
