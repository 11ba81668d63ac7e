"""The upstream session's wire: the lines it writes for MAIL/RCPT (with a scripted channel),
the reply parser, and the Channel protocol on a fake transport."""

from __future__ import annotations

import asyncio
import collections

import pytest
from aiosmtplib import SMTPResponse

from proxy.config import Account
from proxy.smtp.upstream import SmtpUpstreamSession, UpstreamGone
from proxy.smtp.wire import MAX_REPLY, Channel, ReplyError, ReplyParser


class ScriptedChannel:
    """Records what is written; answers with the replies it was given."""

    def __init__(self, *replies: tuple[int, str]) -> None:
        self.writes: list[bytes] = []
        self.replies = collections.deque(SMTPResponse(c, t) for c, t in replies)
        self.stray: list[SMTPResponse] = []
        self.open = True

    def unsolicited(self) -> list[SMTPResponse]:
        stray, self.stray = self.stray, []
        return stray

    def write(self, data: bytes) -> bool:
        self.writes.append(data)
        return False

    async def reply(self) -> SMTPResponse:
        return self.replies.popleft()


def session(*replies: tuple[int, str]) -> tuple[SmtpUpstreamSession, ScriptedChannel]:
    upstream = SmtpUpstreamSession(Account(address="a@gmail.com", provider="gmail",
                                           client_id="x"))
    channel = ScriptedChannel(*replies)
    upstream.channel = channel  # type: ignore[assignment]
    return upstream, channel


@pytest.mark.parametrize(("address", "options", "line"), [
    ("<>", [], b"MAIL FROM:<>\r\n"),  # the null sender, as aiosmtpd parses it
    ("<>", ["SIZE=100", "BODY=8BITMIME"], b"MAIL FROM:<> SIZE=100 BODY=8BITMIME\r\n"),
    ("a@example.test", [], b"MAIL FROM:<a@example.test>\r\n"),
    ("j\udcfcrg@example.test", ["SMTPUTF8"], b"MAIL FROM:<j\xfcrg@example.test> SMTPUTF8\r\n"),
])
async def test_mail_from(address: str, options: list[str], line: bytes) -> None:
    upstream, channel = session((250, "2.1.0 Ok"), (250, "2.1.5 Ok"))
    assert (await upstream.mail(address, options)).code == 250
    assert (await upstream.rcpt("b@example.test", ["NOTIFY=NEVER"])).code == 250
    assert channel.writes == [line, b"RCPT TO:<b@example.test> NOTIFY=NEVER\r\n"]


async def test_mail_and_rcpt_pipelined_in_one_write() -> None:
    upstream, channel = session((553, "5.7.1 <a@x>: Sender address rejected"),
                                (503, "5.5.1 Error: need MAIL command"))
    mail, rcpt = await upstream.mail_rcpt("a@x", ["SIZE=5"], "b@y", [])
    assert (mail.code, rcpt.code) == (553, 503)
    assert channel.writes == [b"MAIL FROM:<a@x> SIZE=5\r\nRCPT TO:<b@y>\r\n"]


async def test_control_characters_are_refused_locally() -> None:
    upstream, channel = session()
    assert (await upstream.mail("a\r@x", [])).code == 501
    assert (await upstream.rcpt("b@y", ["X=\x00"])).code == 501
    assert channel.writes == []


async def test_421_means_gone() -> None:
    upstream, _ = session((421, "4.4.2 mx closing connection"))
    with pytest.raises(UpstreamGone, match=r"421 4\.4\.2 mx closing connection"):
        await upstream.rcpt("b@y", [])
    assert not upstream.connected


async def test_unsolicited_replies_never_answer_the_next_command(
        caplog: pytest.LogCaptureFixture) -> None:
    upstream, channel = session((250, "2.1.5 Ok"))
    channel.stray = [SMTPResponse(250, "2.0.0 stray")]
    assert (await upstream.rcpt("b@y", [])).message == "2.1.5 Ok"
    assert "a reply nothing asked for, ignored: 250 2.0.0 stray" in caplog.text
    upstream, channel = session((250, "2.1.5 Ok"))
    channel.stray = [SMTPResponse(421, "4.4.2 idle too long")]
    with pytest.raises(UpstreamGone, match=r"421 4\.4\.2 idle too long"):
        await upstream.rcpt("b@y", [])
    assert channel.writes == []


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.protocol: asyncio.BaseProtocol | None = None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True


async def test_channel_replies_flow_control_and_loss() -> None:
    transport = FakeTransport()
    channel = Channel(transport)
    assert transport.protocol is channel
    assert channel.write(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n") is False
    waiting = asyncio.create_task(channel.reply())
    await asyncio.sleep(0)
    channel.data_received(b"250 2.1.0 Ok\r\n250-2.1.5 O")
    channel.data_received(b"k\r\n250 2.1.5 more\r\n")
    assert await waiting == SMTPResponse(250, "2.1.0 Ok")
    assert await channel.reply() == SMTPResponse(250, "2.1.5 Ok\n2.1.5 more")
    channel.pause_writing()
    assert channel.write(b"x" * 10) is True
    drained = asyncio.create_task(channel.drain())
    await asyncio.sleep(0)
    assert not drained.done()
    channel.resume_writing()
    await drained
    channel.data_received(b"421 4.4.2 bye\r\n")
    channel.connection_lost(None)
    assert not channel.open
    assert (await channel.reply()).code == 421  # what came before the loss still counts
    with pytest.raises(ConnectionResetError):
        await channel.reply()
    with pytest.raises(ConnectionResetError):
        channel.write(b"QUIT\r\n")


async def test_channel_garbage_aborts() -> None:
    transport = FakeTransport()
    channel = Channel(transport)
    channel.data_received(b"HTTP/1.1 400 Bad Request\r\n")
    assert transport.closing and not channel.open
    with pytest.raises(ReplyError):
        await channel.reply()


def test_reply_parser_multiline_and_split() -> None:
    wire = (b"250-mx.example.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
            b"354 End data with <CR><LF>.<CR><LF>\r\n550 5.1.1 no such user\n")
    for cut in range(len(wire)):
        parser = ReplyParser()
        replies = parser.feed(wire[:cut]) + parser.feed(wire[cut:])
        assert replies == [SMTPResponse(250, "mx.example.test\nPIPELINING\nSIZE 1000"),
                           SMTPResponse(354, "End data with <CR><LF>.<CR><LF>"),
                           SMTPResponse(550, "5.1.1 no such user")]
    assert ReplyParser().feed(b"250\r\n") == [SMTPResponse(250, "")]


@pytest.mark.parametrize("wire", [b"hello\r\n", b"25x ok\r\n", b"250+ok\r\n",
                                  b"2" * (MAX_REPLY + 1)])
def test_reply_parser_refuses_garbage(wire: bytes) -> None:
    with pytest.raises(ReplyError):
        ReplyParser().feed(wire)
