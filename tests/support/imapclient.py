"""A minimal raw IMAP client for tests and benchmarks: exact bytes, literal-aware, no parsing.

It lets a test compare what the proxy relays with what the server sends directly, byte for
byte, and drive the local dialogue exactly (literals, continuations, pipelining).
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from pathlib import Path

_LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}\r\n$")


class RawImap:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting = b""
        self._seq = 0

    @classmethod
    async def connect(
        cls, host: str, port: int, *, ca_file: Path | None = None, timeout: float = 10.0
    ) -> RawImap:
        context = None
        if ca_file is not None:
            context = ssl.create_default_context(cafile=str(ca_file))
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=context, limit=1 << 20)
            client = cls(reader, writer)
            client.greeting = await reader.readline()
        return client

    def tag(self) -> str:
        self._seq += 1
        return f"t{self._seq}"

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_response(self, tag: str, timeout: float = 30.0) -> bytes:
        """Everything up to and including the tagged reply to ``tag``, literals included."""
        out = bytearray()
        prefix = tag.encode() + b" "
        async with asyncio.timeout(timeout):
            while True:
                line = await self.reader.readline()
                if not line:
                    raise ConnectionError(f"closed before the reply to {tag}: {bytes(out)!r}")
                out += line
                while (match := _LITERAL_AT_END.search(line)) is not None:
                    out += await self.reader.readexactly(int(match.group(1)))
                    line = await self.reader.readline()
                    out += line
                if line.startswith(prefix):
                    return bytes(out)

    async def command(self, text: str | bytes, timeout: float = 30.0) -> bytes:
        tag = self.tag()
        line = text.encode() if isinstance(text, str) else text
        await self.send(tag.encode() + b" " + line + b"\r\n")
        return await self.read_response(tag, timeout)

    async def login(self, user: str, password: str) -> bytes:
        quoted = password.replace("\\", "\\\\").replace('"', '\\"')
        return await self.command(f'LOGIN "{user}" "{quoted}"')

    async def xoauth2(self, user: str, token: str) -> bytes:
        ir = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()
        return await self.command(f"AUTHENTICATE XOAUTH2 {ir}")

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def tagged_status(response: bytes) -> bytes:
    """The last line: ``tag OK ...``."""
    return response.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]


async def fetch_direct(host: str, port: int, ca_file: Path, user: str, token: str,
                       fetch: str) -> bytes:
    """``fetch`` (a FETCH command) on INBOX, straight from the server over implicit TLS with
    XOAUTH2: what the proxy's answer must match byte for byte."""
    direct = await RawImap.connect(host, port, ca_file=ca_file)
    try:
        assert tagged_status(await direct.xoauth2(user, token)).startswith(b"t1 OK")
        await direct.command("SELECT INBOX")
        return await direct.command(fetch)
    finally:
        await direct.close()
