"""What the upstream session writes for MAIL and RCPT (the wire, with a recording client)."""

from __future__ import annotations

from typing import Any

import pytest
from aiosmtplib import SMTPResponse

from proxy.config import Account
from proxy.smtp.upstream import SmtpUpstreamSession


class Recorder:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    async def execute_command(self, *args: bytes, timeout: Any = None) -> SMTPResponse:
        self.lines.append(b" ".join(args))
        return SMTPResponse(250, "2.1.0 Ok")


@pytest.mark.parametrize(("address", "options", "line"), [
    ("<>", [], b"MAIL FROM:<>"),  # the null sender, as aiosmtpd parses it
    ("<>", ["SIZE=100", "BODY=8BITMIME"], b"MAIL FROM:<> SIZE=100 BODY=8BITMIME"),
    ("a@example.test", [], b"MAIL FROM:<a@example.test>"),
    ("j\udcfcrg@example.test", ["SMTPUTF8"], b"MAIL FROM:<j\xfcrg@example.test> SMTPUTF8"),
])
async def test_mail_from(address: str, options: list[str], line: bytes) -> None:
    account = Account(address="a@gmail.com", provider="gmail", client_id="x")
    session = SmtpUpstreamSession(account)
    recorder = Recorder()
    session.smtp = recorder  # type: ignore[assignment]
    assert (await session.mail(address, options)).code == 250
    await session.rcpt("b@example.test", [])
    assert recorder.lines == [line, b"RCPT TO:<b@example.test>"]
