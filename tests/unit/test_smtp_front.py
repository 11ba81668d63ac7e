"""The SMTP front on a loopback socket with a second ``Transaction`` implementation (an
in-memory destination, as the outbound queue will be): the front does all client I/O and
passes the destination's replies on; nothing in the relay is involved."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import pytest

from proxy.config import Account, Device, Settings
from proxy.login import Refusal
from proxy.smtp.front import SmtpFront
from proxy.smtp.replies import Reply, format_reply
from proxy.smtp.sessions import Opened
from proxy.smtp.transaction import DataStart
from proxy.smtp.upstream import SmtpUpstreamSession

ACCOUNT = Account(address="a@example.test", provider="custom", client_id="x",
                  token_url="https://t.example/token", imap_server="imap.example:993",
                  smtp_server="smtp.example:587", scopes=[])


class FakeSessions:
    """``front.Sessions`` that checks the local password only and gives the in-memory
    destination; an upstream session is made (as the relay's would be) but never connected."""

    def __init__(self, kept: Kept, upstreams: list[SmtpUpstreamSession],
                 extensions: dict[str, str]) -> None:
        self.kept = kept
        self.upstreams = upstreams
        self.extensions = extensions

    async def log_in(self, user: str, password: str, peer: str) -> Opened:
        if password != "local secret":
            raise Refusal("credentials", "wrong password")
        upstream = SmtpUpstreamSession(ACCOUNT)
        upstream.extensions = dict(self.extensions)
        self.upstreams.append(upstream)
        return Opened(ACCOUNT, self.kept, extensions=frozenset(upstream.extensions))

    def device_for(self, host: str) -> Device | None:
        return None

    async def open_device(self, device: Device) -> Opened:
        raise AssertionError("no devices here")


class Kept:
    """A destination that keeps messages in memory (the shape of the outbound queue)."""

    def __init__(self) -> None:
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.spool = bytearray()
        self.messages: list[tuple[str | None, list[str], bytes, int]] = []
        self.events: list[str] = []
        self.options: list[list[str]] = []  # of each MAIL and RCPT

    # data.Sink
    def send(self, data: bytes) -> bool:
        self.spool += data
        return False

    async def drain(self) -> None:
        pass

    # Transaction
    async def mail(self, sender: str, options: list[str]) -> Reply:
        self.options.append(options)
        self.sender, self.recipients = sender, []
        return format_reply(250, "sender kept", "2.1.0")

    async def rcpt(self, recipient: str, options: list[str]) -> Reply:
        self.options.append(options)
        if recipient.startswith("nobody@"):
            return format_reply(550, "no such mailbox here", "5.1.1")
        self.recipients.append(recipient)
        return format_reply(250, "recipient kept", "2.1.5")

    async def data(self) -> DataStart:
        self.spool = bytearray()
        return DataStart(Reply("354 Go ahead, it will be kept"), self)

    async def finish(self, size: int) -> Reply:
        self.messages.append((self.sender, self.recipients, bytes(self.spool), size))
        return format_reply(250, f"Ok: kept as {len(self.messages)}", "2.0.0")

    def failed(self, reason: str) -> Reply:
        return format_reply(451, f"could not keep it ({reason})", "4.3.0")

    async def refused(self) -> Reply:
        raise AssertionError("this destination never refuses DATA")

    def abort(self) -> None:
        self.events.append(f"abort after {len(self.spool)} bytes")

    async def reset(self) -> Reply:
        self.events.append("reset")
        return format_reply(250, "reset", "2.0.0")

    async def abandon(self) -> None:
        self.events.append("abandon")

    async def quit(self) -> None:
        self.events.append("quit")

    def close(self) -> None:
        self.events.append("close")


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def reply(self) -> str:
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 5)).decode().rstrip("\r\n")
            lines.append(line)
            if line[3:4] != "-":
                return "\n".join(lines)

    async def cmd(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()


@pytest.fixture
async def served(request: pytest.FixtureRequest
                 ) -> AsyncIterator[tuple[Client, Kept, list[SmtpUpstreamSession]]]:
    """Logged in; ``request.param`` (indirect parametrization): the upstream's EHLO
    extensions (default: none)."""
    settings = Settings()
    settings.smtp.max_message_size = 1000
    kept = Kept()
    upstreams: list[SmtpUpstreamSession] = []
    fronts: set[SmtpFront] = set()
    extensions = dict(getattr(request, "param", {}))

    def make() -> SmtpFront:
        front = SmtpFront(settings, "proxy.test", FakeSessions(kept, upstreams, extensions),
                          fronts.discard)
        fronts.add(front)
        return front

    server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    client = Client(reader, writer)
    assert (await client.reply()).startswith("220 proxy.test ")
    assert "250-SIZE 1000\n" in await client.cmd("EHLO client.test")
    blob = base64.b64encode(b"\0a@example.test\0local secret").decode()
    assert await client.cmd(f"AUTH PLAIN {blob}") == "235 2.7.0 Authentication successful"
    yield client, kept, upstreams
    writer.close()
    for _ in range(50):
        if not fronts:
            break
        await asyncio.sleep(0.01)
    server.close()
    await server.wait_closed()
    assert not fronts and kept.events[-1] == "close"


async def test_the_destinations_replies_reach_the_client(
        served: tuple[Client, Kept, list[SmtpUpstreamSession]]) -> None:
    client, kept, upstreams = served
    assert await client.cmd("MAIL FROM:<a@example.test>") == "250 2.1.0 sender kept"
    assert await client.cmd("RCPT TO:<nobody@example.test>") == \
        "550 5.1.1 no such mailbox here"
    assert await client.cmd("RCPT TO:<b@example.test>") == "250 2.1.5 recipient kept"
    assert await client.cmd("DATA") == "354 Go ahead, it will be kept"
    wire = b"Subject: hi\r\n\r\n..dot\r\nend\r\n.\r\n"
    client.writer.write(wire[:9])
    await asyncio.sleep(0.05)
    client.writer.write(wire[9:] + b"NOOP\r\n")  # a command right after the end marker
    assert await client.reply() == "250 2.0.0 Ok: kept as 1"
    assert await client.reply() == "250 2.0.0 OK"
    # Unchanged: still dot-stuffed, end marker included; the size is without ".\r\n".
    assert kept.messages == [("a@example.test", ["b@example.test"], wire, len(wire) - 3)]
    assert await client.cmd("RSET") == "250 2.0.0 reset"
    assert await client.cmd("QUIT") == "221 2.0.0 Bye"
    assert kept.events[:2] == ["reset", "quit"]
    assert [u.connected for u in upstreams] == [False]  # no upstream connection was used


async def test_too_big_is_read_to_the_end_and_aborted(
        served: tuple[Client, Kept, list[SmtpUpstreamSession]]) -> None:
    client, kept, _ = served
    assert (await client.cmd("MAIL FROM:<a@example.test>")).startswith("250 ")
    assert (await client.cmd("RCPT TO:<b@example.test>")).startswith("250 ")
    assert (await client.cmd("DATA")).startswith("354 ")
    client.writer.write(b"x" * 600 + b"\r\n")
    await asyncio.sleep(0.05)  # read on its own: this part fits and goes into the sink
    client.writer.write(b"y" * 600 + b"\r\n.\r\n")
    assert await client.reply() == \
        "552 5.3.4 message exceeds the size limit of 1000 bytes; nothing was sent"
    assert kept.messages == [] and kept.events == ["abort after 602 bytes"]
    # The session goes on; the envelope was forgotten.
    assert (await client.cmd("RCPT TO:<b@example.test>")).startswith("503 ")
    assert await client.cmd("EHLO again.test") != ""
    assert kept.events[-1] == "abandon"


# -- issue 12, item 7 ----------------------------------------------------------------------


async def test_helo_inside_a_transaction_abandons_it(
        served: tuple[Client, Kept, list[SmtpUpstreamSession]]) -> None:
    # Only EHLO did: the upstream kept its transaction and the next MAIL got a 503.
    client, kept, _ = served
    assert (await client.cmd("MAIL FROM:<a@example.test>")).startswith("250 ")
    assert (await client.cmd("RCPT TO:<b@example.test>")).startswith("250 ")
    assert (await client.cmd("HELO again.test")) == "250 proxy.test"
    assert kept.events[-1] == "abandon"
    assert (await client.cmd("RCPT TO:<b@example.test>")).startswith("503 ")


async def test_ehlo_after_auth_offers_only_what_the_upstream_offers(
        served: tuple[Client, Kept, list[SmtpUpstreamSession]]) -> None:
    client, _, _ = served  # an upstream with no extensions at all
    ehlo = await client.cmd("EHLO again.test")
    assert "8BITMIME" not in ehlo and "SMTPUTF8" not in ehlo and "DSN" not in ehlo
    assert "250-SIZE 1000\n" in ehlo  # [smtp] max_message_size is this proxy's own limit


@pytest.mark.parametrize("served", [{"dsn": "", "8bitmime": "", "size": "5000"}],
                         indirect=True)
async def test_dsn_parameters_pass_through_when_the_upstream_has_dsn(
        served: tuple[Client, Kept, list[SmtpUpstreamSession]]) -> None:
    client, kept, _ = served
    ehlo = await client.cmd("EHLO again.test")
    assert "250-DSN" in ehlo and "250-8BITMIME" in ehlo and "SMTPUTF8" not in ehlo
    reply = await client.cmd("MAIL FROM:<a@example.test> RET=HDRS ENVID=x1")
    assert reply.startswith("250 "), reply
    reply = await client.cmd("RCPT TO:<b@example.test> NOTIFY=SUCCESS,FAILURE "
                             "ORCPT=rfc822;b@example.test")
    assert reply.startswith("250 "), reply
    assert kept.options[-2:] == [["RET=HDRS", "ENVID=X1"],
                                 ["NOTIFY=SUCCESS,FAILURE", "ORCPT=RFC822;B@EXAMPLE.TEST"]]


async def test_dsn_parameters_are_refused_without_dsn_upstream(
        served: tuple[Client, Kept, list[SmtpUpstreamSession]]) -> None:
    client, _, _ = served
    reply = await client.cmd("MAIL FROM:<a@example.test> RET=HDRS")
    assert reply.startswith("555 "), reply
