"""The streamed DATA path: the end-marker scanner fed in every chunking, and ``pump`` with an
in-memory client stream and a fake upstream."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable

import pytest

from proxy.smtp.data import CHUNK, EndOfData, Outcome, pump
from proxy.smtp.upstream import UpstreamGone

# Messages as the client sends them after DATA: dot-stuffed, ending with the end marker.
WIRES = [
    b".\r\n",  # the empty message
    b"a\r\n.\r\n",
    b"..\r\n.\r\n",  # one line holding "."
    b"...\r\n.\r\n",  # one line holding ".."
    b"a\r\n..b\r\n...c\r\n..\r\n.\r\n",
    b"\r\n.\r\n",  # one empty line
    b"x\r\n.\r.\n.\n.\r\n. \r\n.x\r\n.\r\n",  # bare CR/LF and near misses are content
    b"line\r\n" * 50 + b".\r\n",
]


def find_end(wire: bytes, cuts: list[int]) -> tuple[int, int]:
    """Feed ``wire`` cut at ``cuts``; (index of the chunk that ended it, offset in it)."""
    scanner = EndOfData()
    bounds = [0, *cuts, len(wire)]
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        end = scanner.feed(wire[a:b])
        if end >= 0:
            return i, a + end
    return -1, -1


@pytest.mark.parametrize("wire", WIRES)
def test_end_found_at_every_split(wire: bytes) -> None:
    for cut in range(1, len(wire)):
        chunk, at = find_end(wire, [cut])
        assert at == len(wire), (wire, cut)
        assert chunk == (0 if cut >= len(wire) else 1)
    assert find_end(wire, list(range(1, len(wire)))) == (len(wire) - 1, len(wire))


@pytest.mark.parametrize("wire", WIRES)
def test_end_found_in_random_chunkings_with_trailing_commands(wire: bytes) -> None:
    rng = random.Random(len(wire))
    data = wire + b"QUIT\r\n.\r\n"
    for _ in range(200):
        cuts = sorted(set(rng.sample(range(1, len(data)), k=min(len(data) - 1,
                                                                 rng.randint(1, 6)))))
        assert find_end(data, cuts)[1] == len(wire)


def test_no_end_without_the_marker() -> None:
    scanner = EndOfData()
    for chunk in (b"a\r\n", b"..\r\n", b".", b"x\r\n", b"\r\n..", b"\r\n", b". \r\n", b"\r"):
        assert scanner.feed(chunk) == -1
    assert scanner.feed(b"\n.\r\n") == 4


class FakeUpstream:
    def __init__(self, fail_after: int | None = None, congested: bool = False) -> None:
        self.received = bytearray()
        self.fail_after = fail_after
        self.congested = congested
        self.drains = 0

    def send(self, data: bytes) -> bool:
        if self.fail_after is not None and len(self.received) + len(data) > self.fail_after:
            raise UpstreamGone("connection reset by peer")
        self.received += data
        return self.congested

    async def drain(self) -> None:
        self.drains += 1


async def run_pump(chunks: list[bytes], upstream: FakeUpstream, limit: int | None = None,
                   eof: bool = False, go_ahead: Callable[[], Awaitable[bool]] | None = None
                   ) -> tuple[Outcome, int, asyncio.StreamReader, int]:
    reader = asyncio.StreamReader(limit=1001)  # aiosmtpd's

    async def feed() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)
        if eof:
            reader.feed_eof()

    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1

    feeder = asyncio.create_task(feed())
    result = await asyncio.wait_for(pump(reader, upstream, limit, tick, go_ahead), 5)
    await feeder
    return result.outcome, result.size, reader, ticks


async def test_pump_forwards_bytes_unchanged_and_leaves_the_next_command() -> None:
    body = b"a\r\n..b\r\n..\r\n" + b"z" * 3000 + b"\r\n"
    upstream = FakeUpstream(congested=True)
    outcome, size, reader, ticks = await run_pump(
        [body[:7], body[7:2500], body[2500:] + b".", b"\r\nQUIT\r\nNOOP\r\n"], upstream)
    assert outcome is Outcome.SENT and size == len(body)
    assert bytes(upstream.received) == body + b".\r\n"
    assert upstream.drains == 4 and ticks == 4
    assert await reader.readuntil(b"\r\n") == b"QUIT\r\n"
    assert await reader.readuntil(b"\r\n") == b"NOOP\r\n"


async def test_pump_empty_message_and_large_chunks() -> None:
    upstream = FakeUpstream()
    outcome, size, _, _ = await run_pump([b".\r\nQUIT\r\n"], upstream)
    assert (outcome, size, bytes(upstream.received)) == (Outcome.SENT, 0, b".\r\n")
    big = (b"x" * 998 + b"\r\n") * 1000  # 1 MB, arriving in one piece: read in CHUNKs
    upstream = FakeUpstream()
    outcome, size, _, ticks = await run_pump([big + b".\r\n"], upstream)
    assert outcome is Outcome.SENT and size == len(big)
    assert bytes(upstream.received) == big + b".\r\n"
    assert ticks == -(-(len(big) + 3) // CHUNK)


@pytest.mark.parametrize("extra", [0, 1])
async def test_pump_size_limit(extra: int) -> None:
    body = b"y" * (98 + extra) + b"\r\n"  # 100 bytes: at the limit, or one more
    upstream = FakeUpstream()
    outcome, size, reader, _ = await run_pump([body[:50], body[50:], b".\r\nRSET\r\n"],
                                              upstream, limit=100)
    if extra:
        assert outcome is Outcome.TOO_BIG and size == 101
        assert b".\r\n" not in upstream.received  # never the end marker
    else:
        assert outcome is Outcome.SENT and size == 100
        assert bytes(upstream.received) == body + b".\r\n"
    assert await reader.readuntil(b"\r\n") == b"RSET\r\n"


async def test_pump_too_big_in_the_chunk_holding_the_end() -> None:
    upstream = FakeUpstream()
    outcome, _, _, _ = await run_pump([b"a" * 50, b"b" * 60 + b"\r\n.\r\n"], upstream,
                                      limit=100)
    assert outcome is Outcome.TOO_BIG and bytes(upstream.received) == b"a" * 50


async def test_pump_upstream_lost_reads_to_the_end() -> None:
    upstream = FakeUpstream(fail_after=10)
    outcome, _, reader, _ = await run_pump([b"a" * 8, b"b" * 8, b"\r\nc\r\n.\r\nQUIT\r\n"],
                                           upstream)
    assert outcome is Outcome.UPSTREAM_LOST and bytes(upstream.received) == b"a" * 8
    assert await reader.readuntil(b"\r\n") == b"QUIT\r\n"


async def test_pump_client_eof() -> None:
    upstream = FakeUpstream()
    outcome, _, _, _ = await run_pump([b"half a message\r\n."], upstream, eof=True)
    assert outcome is Outcome.CLIENT_GONE
    assert bytes(upstream.received) == b"half a message\r\n."


class GoAhead:
    """The upstream's reply to DATA, arriving when the test says so."""

    def __init__(self) -> None:
        self.reply: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.calls = 0

    async def __call__(self) -> bool:
        self.calls += 1
        return await self.reply


async def test_pump_writes_nothing_before_the_go_ahead() -> None:
    upstream = FakeUpstream()
    gate = GoAhead()
    body = b"first\r\n" + b"x" * 5000 + b"\r\n"
    task = asyncio.create_task(run_pump([body[:100], body[100:], b".\r\nQUIT\r\n"], upstream,
                                        go_ahead=gate))
    for _ in range(20):
        await asyncio.sleep(0)
    assert gate.calls == 1 and upstream.received == b""  # waiting, nothing sent yet
    gate.reply.set_result(True)
    outcome, size, reader, _ = await task
    assert outcome is Outcome.SENT and size == len(body) and gate.calls == 1
    assert bytes(upstream.received) == body + b".\r\n"
    assert await reader.readuntil(b"\r\n") == b"QUIT\r\n"


async def test_pump_refused_reads_to_the_end_and_sends_nothing() -> None:
    upstream = FakeUpstream()
    gate = GoAhead()
    gate.reply.set_result(False)
    outcome, size, reader, ticks = await run_pump(
        [b"a\r\n", b"..b\r\n" * 100, b".\r\nRSET\r\n"], upstream, go_ahead=gate)
    assert (outcome, size, ticks, gate.calls) == (Outcome.REFUSED, 3 + 500, 3, 1)
    assert upstream.received == b""
    assert await reader.readuntil(b"\r\n") == b"RSET\r\n"


async def test_pump_upstream_lost_before_the_go_ahead() -> None:
    upstream = FakeUpstream()

    async def gone() -> bool:
        raise UpstreamGone("connection reset by peer")

    outcome, _, reader, _ = await run_pump([b"a\r\n", b"b\r\n.\r\nQUIT\r\n"], upstream,
                                           go_ahead=gone)
    assert outcome is Outcome.UPSTREAM_LOST and upstream.received == b""
    assert await reader.readuntil(b"\r\n") == b"QUIT\r\n"


async def test_pump_too_big_at_once_never_asks() -> None:
    # The first chunk is over the limit already: nothing will be sent, so the upstream's
    # 354 is not waited for (the relay closes that connection).
    gate = GoAhead()
    outcome, _, _, _ = await run_pump([b"z" * 200 + b"\r\n.\r\n"], FakeUpstream(), limit=100,
                                      go_ahead=gate)
    assert outcome is Outcome.TOO_BIG and gate.calls == 0


# -- issue 12, item 6: SMTP smuggling reproducers ------------------------------------------


def _bare(data: bytes) -> bool:
    """Whether ``data`` holds a LF without its CR or a CR without its LF."""
    return data.count(b"\n") != data.count(b"\r\n") or data.count(b"\r") != data.count(b"\r\n")


@pytest.mark.parametrize("cut", [None, 1, 5, 9, 10, 11])
async def test_pump_ends_at_lf_dot_lf_and_never_forwards_a_bare_lf(cut: int | None) -> None:
    # Postfix (and many servers) end a message at LF . LF: forwarded unchanged, it ended the
    # message upstream while the proxy kept reading, and what followed ran upstream unseen.
    wire = b"Subject: x\n\nbody\n.\nMAIL FROM:<evil@example.test>\r\n"
    chunks = [wire] if cut is None else [wire[:cut], wire[cut:]]
    upstream = FakeUpstream()
    outcome, _, reader, _ = await run_pump(chunks, upstream)
    assert outcome is Outcome.SENT
    assert bytes(upstream.received) == b"Subject: x\r\n\r\nbody\r\n.\r\n"
    assert await reader.readuntil(b"\r\n") == b"MAIL FROM:<evil@example.test>\r\n"


@pytest.mark.parametrize("wire", [b"a\rb\r\n.\r\n", b"a\r\n.\rRCPT TO:<x@example.test>\r\n.\r\n",
                                  b"a\r\n\r.\r\n", b"x\r\n.\r.\n.\n.\r\n"])
async def test_pump_never_forwards_a_lone_cr_or_bare_lf(wire: bytes) -> None:
    rest = b"QUIT\r\n"
    for cut in range(1, len(wire)):
        upstream = FakeUpstream()
        outcome, _, _, _ = await run_pump([wire[:cut], wire[cut:] + rest], upstream)
        assert outcome is Outcome.SENT, (wire, cut)
        assert not _bare(bytes(upstream.received)), (wire, cut, bytes(upstream.received))
        assert bytes(upstream.received).endswith(b"\r\n.\r\n")


async def test_pump_normalizes_any_line_ends_in_any_chunking() -> None:
    import re

    rng = random.Random(6)
    ends = [b"\r\n", b"\r\n", b"\n", b"\r"]
    for _ in range(300):
        lines = [rng.choice([b"a", b"..", b".x", b"", b"text \xff", b"."]) for _ in range(6)]
        raw = b"".join(line + rng.choice(ends) for line in lines) + b".\r\nQUIT\r\n"
        # The reference: the first line holding only "." ends the message, whatever its end.
        # A lone CR at the very end of a line is decided by the next byte, as on the wire.
        end = next(m.end() for m in re.finditer(rb"([^\r\n]*)(\r\n|\r|\n)", raw)
                   if m.group(1) == b".")
        cuts = sorted(set(rng.sample(range(1, len(raw)), k=rng.randint(0, 5))))
        chunks = [raw[a:b] for a, b in itertools.pairwise([0, *cuts, len(raw)])]
        upstream = FakeUpstream()
        outcome, _, reader, _ = await run_pump(chunks, upstream, eof=True)
        assert outcome is Outcome.SENT, raw
        assert bytes(upstream.received) == re.sub(rb"\r\n|\r|\n", b"\r\n", raw[:end]), raw
        assert await reader.read() == raw[end:], (raw, cuts)
