"""One upstream SMTP session: TLS, EHLO, AUTH XOAUTH2/OAUTHBEARER in the two-step form with
aiosmtplib, then MAIL/RCPT/DATA through a ``wire.Channel`` (pipelined MAIL+RCPT, the message
streamed), with the server's replies handed back unchanged.

Implements ``login.Upstream``. Every way the connection can fail while relaying becomes
``UpstreamGone`` (a ``data.SinkGone``), so the relay knows the server never confirmed what was
in flight.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from typing import cast

import aiosmtplib
from aiosmtplib import SMTPResponse

from ..config import Account
from ..core.sasl import (
    Mechanism,
    choose_mechanism,
    failure_acknowledgement,
    initial_response,
    parse_failure_challenge,
)
from ..login import (
    Refusal,
    UpstreamError,
    UpstreamRejection,
    local_shortage,
    setting_fix,
    upstream_tls,
)
from ..net import describe_error, out_of_resources
from .data import SinkGone
from .wire import Channel, ReplyError

log = logging.getLogger("mailproxy.smtp")

UPSTREAM_TIMEOUT = 60.0
# RFC 5321 4.5.3.2.6: wait up to 10 minutes for the reply to the end of the message.
DATA_END_TIMEOUT = 600.0
# RFC 5321 4.5.3.2.5: a server may wait 3 minutes for each block of the message.
DATA_BLOCK_TIMEOUT = 180.0
LOCAL_HOSTNAME = "localhost"


class UpstreamGone(SinkGone):
    """The upstream connection broke (closed, reset, timed out, 421) while relaying."""


def one_line(response: SMTPResponse) -> str:
    return f"{response.code} {' '.join(response.message.split())}"


class SmtpUpstreamSession:
    """The upstream side of one client session."""

    proto = "smtp"

    def __init__(self, account: Account, timeout: float = UPSTREAM_TIMEOUT) -> None:
        server = account.server("smtp")
        if server is None:
            raise Refusal("misconfigured", f"account {account.address} has no smtp_server "
                          "configured; add one to use it over SMTP")
        self.account = account
        self.server = server
        self.description = str(server)
        self.timeout = timeout
        self.mechanism: Mechanism | None = None
        self.channel: Channel | None = None
        self.extensions: dict[str, str] = {}
        implicit = server.tls == "implicit"
        # STARTTLS is done in ``connect``, around it Nagle is switched (see there).
        self.smtp = aiosmtplib.SMTP(
            hostname=server.host, port=server.port, use_tls=implicit,
            start_tls=False, tls_context=upstream_tls(account),
            timeout=timeout, local_hostname=LOCAL_HOSTNAME)

    # -- login.Upstream ------------------------------------------------------------------

    async def connect(self) -> None:
        try:
            await self.smtp.connect()
            if self.server.tls == "starttls":
                await self.smtp.ehlo()
                # With TLS 1.3 the server sends its session tickets after the handshake, and
                # its Nagle holds the reply to our next command until they are acknowledged.
                # With TCP_NODELAY that command leaves before the tickets arrive, and nothing
                # acknowledges them before our delayed-ACK timer: ~40 ms on more than 1 login
                # in 10 against Postfix. With Nagle on, the command waits for the ACK of our
                # Finished, which comes with the tickets, and carries their ACK. Off again
                # after the first reply.
                _set_nodelay(self.smtp, False)
                await self.smtp.starttls()
            await self.smtp.ehlo()
            _set_nodelay(self.smtp, True)
        except aiosmtplib.SMTPResponseException as exc:
            self.close()
            # With STARTTLS, a 5xx while connecting is the greeting or STARTTLS refused for good.
            fix = setting_fix(self.account, "smtp", "starttls") \
                if exc.code >= 500 and self.server.tls == "starttls" else None
            raise UpstreamError(f"{exc.code} {' '.join(exc.message.split())}", fix) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.close()
            if "STARTTLS extension not supported" in str(exc):
                raise UpstreamError("server does not offer STARTTLS",
                                    setting_fix(self.account, "smtp", "starttls")) from None
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            if isinstance(cause, OSError) and out_of_resources(cause):
                raise local_shortage(cause) from None  # here, not at the server
            raise UpstreamError(describe_error(cause)) from None
        offered = frozenset(f"AUTH={m.upper()}" for m in self.smtp.server_auth_methods)
        self.mechanism = choose_mechanism(offered, self.account.sasl_mechanism)
        if self.mechanism is None:
            self.close()
            names = " ".join(sorted(m.removeprefix("AUTH=") for m in offered)) or "none"
            raise UpstreamError(f"the server offers no usable OAuth2 mechanism (AUTH {names})",
                                setting_fix(self.account, "smtp", "mechanism"))

    async def authenticate(self, token: str) -> UpstreamRejection | None:
        mechanism = self.mechanism
        assert mechanism is not None
        try:
            # Two steps: the token (1-3 KB) never goes on the 512-octet AUTH command line.
            response = await self.smtp.execute_command(b"AUTH", mechanism.encode())
            if response.code == 334:
                response = await self.smtp.execute_command(initial_response(
                    mechanism, self.account.sasl_user, token, self.server.host,
                    self.server.port))
                if response.code == 334:
                    # A failure challenge: acknowledge it to get the final verdict.
                    detail = parse_failure_challenge(response.message.encode())
                    log.info("%s sent a failure challenge (status %s)", self.description,
                             detail.get("status", "?"))
                    response = await self.smtp.execute_command(
                        failure_acknowledgement(mechanism))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.close()
            raise Refusal("unavailable", f"{self.description}: connection lost during AUTH "
                          f"({describe_error(exc)}); try again later") from None
        if response.code == 235:
            self._attach()
            return None
        return UpstreamRejection(one_line(response), temporary=400 <= response.code < 500)

    def close(self) -> None:
        self.channel = None
        self.smtp.close()

    def _attach(self) -> None:
        # Logged in: from here on the connection is relayed through a Channel.
        transport = self.smtp.transport
        if transport is None or transport.is_closing():
            return  # gone already: ``connected`` is False and the next MAIL reconnects
        self.extensions = dict(self.smtp.esmtp_extensions)
        # A stream transport, though not always a subclass of asyncio.Transport (uvloop's).
        self.channel = Channel(cast(asyncio.Transport, transport))

    # -- relay ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.channel is not None and self.channel.open

    @property
    def size_limit(self) -> int | None:
        """The server's SIZE, if it announced one."""
        value = self.extensions.get("size", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    @property
    def pipelining(self) -> bool:
        """RFC 2920: the server takes several commands before it replies."""
        return "pipelining" in self.extensions

    async def _exchange(self, lines: bytes, count: int,
                        timeout: float | None = None) -> list[SMTPResponse]:
        """Write ``lines`` (``count`` commands) and read their replies."""
        self._write_commands(lines)
        return await self._replies(count, timeout)

    def _write_commands(self, lines: bytes) -> None:
        channel = self.channel
        try:
            if channel is None:
                raise ConnectionResetError("not connected")
            self._check_unsolicited(channel)
            channel.write(lines)
        except (OSError, ReplyError) as exc:
            self.close()
            raise UpstreamGone(describe_error(exc)) from None

    async def _replies(self, count: int, timeout: float | None = None) -> list[SMTPResponse]:
        channel = self.channel
        try:
            if channel is None:
                raise ConnectionResetError("not connected")
            async with asyncio.timeout(self.timeout if timeout is None else timeout):
                replies = [await channel.reply() for _ in range(count)]
        except (OSError, ReplyError, TimeoutError) as exc:
            self.close()
            raise UpstreamGone(describe_error(exc)) from None
        for response in replies:
            if response.code == 421:  # the server is closing the connection
                self.close()
                raise UpstreamGone(one_line(response))
        return replies

    def _check_unsolicited(self, channel: Channel) -> None:
        # Between transactions a server may only say 421 (closing). Anything else would be
        # taken as the reply to the next command, and every later reply would be off by one.
        for response in channel.unsolicited():
            if response.code == 421:
                raise ConnectionResetError(one_line(response))
            log.warning("smtp: %s sent a reply nothing asked for, ignored: %s",
                        self.description, one_line(response))

    async def command(self, *args: bytes, timeout: float | None = None) -> SMTPResponse:
        return (await self._exchange(b" ".join(args) + b"\r\n", 1, timeout))[0]

    async def mail(self, address: str, options: list[str]) -> SMTPResponse:
        line = _mail_line(address, options)
        if _CONTROL.search(line):
            return _BAD_ARGUMENT
        return (await self._exchange(line + b"\r\n", 1))[0]

    async def rcpt(self, address: str, options: list[str]) -> SMTPResponse:
        line = _rcpt_line(address, options)
        if _CONTROL.search(line):
            return _BAD_ARGUMENT
        return (await self._exchange(line + b"\r\n", 1))[0]

    async def mail_rcpt(self, sender: str, sender_options: list[str], recipient: str,
                        recipient_options: list[str]) -> tuple[SMTPResponse, SMTPResponse]:
        """MAIL and the first RCPT in one write (needs ``pipelining``), both replies."""
        mail, rcpt = _mail_line(sender, sender_options), _rcpt_line(recipient,
                                                                    recipient_options)
        if _CONTROL.search(mail):
            return _BAD_ARGUMENT, _BAD_ARGUMENT
        if _CONTROL.search(rcpt):
            return await self.mail(sender, sender_options), _BAD_ARGUMENT
        first, second = await self._exchange(mail + b"\r\n" + rcpt + b"\r\n", 2)
        return first, second

    def start_data(self) -> None:
        """Send DATA; ``data_reply`` is the server's answer. After a 354 the message goes
        with ``send``, and ``finish_data`` is the reply to its end."""
        self._write_commands(b"DATA\r\n")

    async def data_reply(self) -> SMTPResponse:
        return (await self._replies(1))[0]

    def send(self, data: bytes) -> bool:
        """Write message bytes as they are; True when ``drain`` must be awaited (the
        transport, the TLS one too, is above its high-water mark)."""
        channel = self.channel
        try:
            if channel is None:
                raise ConnectionResetError("not connected")
            return channel.write(data)
        except OSError as exc:
            self.close()
            raise UpstreamGone(describe_error(exc)) from None

    async def drain(self) -> None:
        channel = self.channel
        try:
            if channel is None:
                raise ConnectionResetError("not connected")
            async with asyncio.timeout(DATA_BLOCK_TIMEOUT):
                await channel.drain()
        except (OSError, TimeoutError) as exc:
            self.close()
            raise UpstreamGone(describe_error(exc)) from None

    async def finish_data(self) -> SMTPResponse:
        """The server's reply to the end of the message (written by ``send``)."""
        return (await self._replies(1, DATA_END_TIMEOUT))[0]

    async def quit(self) -> None:
        try:
            if self.connected:
                await self._exchange(b"QUIT\r\n", 1, 5.0)
        except UpstreamGone:
            pass
        finally:
            self.close()


def _set_nodelay(smtp: aiosmtplib.SMTP, on: bool) -> None:
    transport = smtp.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if on else 0)
        except OSError:
            pass  # the connection is gone: the next step reports it


# aiosmtplib refused these (ValueError) in command arguments: they would break the line.
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_BAD_ARGUMENT = SMTPResponse(501, "5.5.4 Control characters are not allowed in an address "
                             "or its parameters")


def _mail_line(address: str, options: list[str]) -> bytes:
    # aiosmtpd hands the null reverse-path (bounces, DSNs) over as "<>": wrapped once
    # more it would be "<<>>", which Postfix forgives and stricter servers refuse.
    path = b"<>" if address == "<>" else b"<" + _raw(address) + b">"
    return b" ".join([b"MAIL FROM:" + path, *(_raw(o) for o in options)])


def _rcpt_line(address: str, options: list[str]) -> bytes:
    return b" ".join([b"RCPT TO:<" + _raw(address) + b">",
                      *(_raw(o) for o in options)])


def _raw(address: str) -> bytes:
    # aiosmtpd decodes arguments as UTF-8 with surrogateescape: this gives the client's bytes.
    return address.encode("utf-8", "surrogateescape")
