"""The SMTP front (aiosmtpd) before login, on a loopback socket with a fake gate: replies to
what a client may send before it has logged in (issue 12, items 7 and 8)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from proxy.config import Settings
from proxy.login import Gate, Refusal
from proxy.observe import Observer
from proxy.smtp.service import SmtpService


class _Gate:
    def __init__(self) -> None:
        self.logins: list[tuple[str, str]] = []
        self.observer = Observer()

    async def log_in(self, proto: str, user: str, password: str, make: Any) -> Any:
        self.logins.append((user, password))
        raise Refusal("credentials", "Invalid credentials")


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = 5.0) -> list[bytes]:
        """One reply, all its lines (CRLF removed)."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            assert line.endswith(b"\r\n"), (lines, line)
            lines.append(line[:-2])
            if line[3:4] == b" ":
                return lines


@pytest.fixture
async def front() -> AsyncIterator[tuple[Client, _Gate]]:
    gate = _Gate()
    service = SmtpService(cast(Gate, gate), Settings())
    server = await service.start("127.0.0.1", 0, 100)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = Client(reader, writer)
    try:
        assert (await client.reply())[0].startswith(b"220 ")
        yield client, gate
    finally:
        writer.close()
        server.close()
        await service.drain(0.1)
        await server.wait_closed()


def _well_formed(reply: list[bytes]) -> bool:
    return all(len(line) + 2 <= 512 and all(0x20 <= c < 0x7F for c in line) for line in reply)


async def _ehlo(client: Client) -> None:
    await client.send(b"EHLO client.example\r\n")
    assert b"250 ENHANCEDSTATUSCODES" in (await client.reply())[-1]


async def test_overlong_auth_response_is_refused_and_its_rest_not_run(
        front: tuple[Client, _Gate], caplog: pytest.LogCaptureFixture) -> None:
    # aiosmtpd raised (two tracebacks, 451) and ran the rest of the line as a command.
    client, gate = front
    await _ehlo(client)
    await client.send(b"AUTH PLAIN\r\n")
    assert (await client.reply())[0].startswith(b"334")
    await client.send(b"A" * 1100)
    await asyncio.sleep(0.05)
    await client.send(b"HELO smuggled\r\nNOOP\r\n")
    refused = await client.reply()
    assert refused[0][:1] == b"5" and _well_formed(refused), refused
    assert (await client.reply())[0].startswith(b"250 2.0.0"), "NOOP's reply comes next"
    assert not gate.logins
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_line_without_crlf_is_bounded(front: tuple[Client, _Gate]) -> None:
    # 100 MB went in within 0.2 s with no reply until the idle timeout (300 s).
    client, _ = front
    with contextlib.suppress(ConnectionError):
        for _ in range(64):
            await client.send(b"A" * 65536)
    reply = await client.reply(timeout=5.0)
    assert reply[0][:1] in (b"4", b"5") and _well_formed(reply), reply


async def test_authzid_other_than_the_user_is_refused(front: tuple[Client, _Gate]) -> None:
    import base64

    client, gate = front
    await _ehlo(client)
    blob = base64.b64encode(b"boss@example.test\0me@example.test\0pw")
    await client.send(b"AUTH PLAIN " + blob + b"\r\n")
    reply = await client.reply()
    assert reply[0].startswith(b"535 5.7."), reply
    assert not gate.logins


@pytest.mark.parametrize("command", [b"\x1b[31mRED", b"BOGUS\x00", b"MA\xffIL", b"X" * 500])
async def test_unknown_commands_get_well_formed_replies_and_clean_log_lines(
        front: tuple[Client, _Gate], caplog: pytest.LogCaptureFixture, command: bytes) -> None:
    client, _ = front
    await _ehlo(client)
    caplog.set_level(logging.INFO)
    await client.send(command + b"\r\n")
    reply = await client.reply()
    assert reply[0].startswith(b"500 5.5.") and _well_formed(reply), reply
    for record in caplog.records:
        message = record.getMessage()
        assert all(c >= " " and c != "\x7f" for c in message), message


async def test_too_many_unknown_commands_close_with_421_not_502(
        front: tuple[Client, _Gate]) -> None:
    client, _ = front
    await _ehlo(client)
    replies = []
    with contextlib.suppress(ConnectionError):
        await client.send(b"XYZZY\r\n" * 30)
    with contextlib.suppress(ConnectionError, AssertionError, asyncio.IncompleteReadError):
        for _ in range(30):
            replies.append(await client.reply(timeout=2.0))
    closing = [r for r in replies if r[0][:3] not in (b"500",)]
    assert all(r[0].startswith(b"421 4.") for r in closing), closing


async def test_replies_after_ehlo_carry_enhanced_codes(front: tuple[Client, _Gate]) -> None:
    client, _ = front
    await _ehlo(client)
    for command in (b"MAIL FROM:<a@example.test> BOGUS=1", b"MAIL", b"RCPT", b"VRFY",
                    b"AUTH", b"AUTH PLAIN =", b"HELP x", b"NOOP x", b"DATA x", b"RSET x"):
        await client.send(command + b"\r\n")
        reply = await client.reply()
        for line in reply:
            assert line[4:5] == line[:1] and line[5:6] == b".", (command, reply)
