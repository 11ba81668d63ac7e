"""The upstream session's wire: the lines it writes for MAIL/RCPT (with a scripted channel)
and the reply parser."""

from __future__ import annotations

import collections

import pytest
from aiosmtplib import SMTPResponse

from proxy.config import Account
from proxy.smtp.upstream import SmtpUpstreamSession, UpstreamGone
from proxy.smtp.wire import MAX_REPLY, ReplyError, ReplyParser


class ScriptedChannel:
    """Records what is written; answers with the replies it was given."""

    def __init__(self, *replies: tuple[int, str]) -> None:
        self.writes: list[bytes] = []
        self.replies = collections.deque(SMTPResponse(c, t) for c, t in replies)
        self.open = True

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
