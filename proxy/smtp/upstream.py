"""One upstream SMTP session (aiosmtplib): TLS, EHLO, AUTH XOAUTH2/OAUTHBEARER in the two-step
form, then MAIL/RCPT/DATA with the server's replies handed back unchanged.

Implements ``login.Upstream``. Every way the connection can fail while relaying becomes
``UpstreamGone``, so the front knows the server never confirmed what was in flight.
"""

from __future__ import annotations

import asyncio
import logging

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
from ..login import Refusal, UpstreamError, UpstreamRejection
from ..net import client_tls_context, describe_error

log = logging.getLogger("mailproxy.smtp")

UPSTREAM_TIMEOUT = 60.0
# RFC 5321 4.5.3.2.6: wait up to 10 minutes for the reply to the end of the message.
DATA_END_TIMEOUT = 600.0
# RFC 5321 4.5.3.2.5: a server may wait 3 minutes for each block of the message.
DATA_BLOCK_TIMEOUT = 180.0
LOCAL_HOSTNAME = "localhost"


class UpstreamGone(Exception):
    """The upstream connection broke (closed, reset, timed out, 421) while relaying."""


def one_line(response: SMTPResponse) -> str:
    return f"{response.code} {' '.join(response.message.split())}"


class SmtpUpstreamSession:
    """The upstream side of one client session."""

    def __init__(self, account: Account, timeout: float = UPSTREAM_TIMEOUT) -> None:
        server = account.server("smtp")
        if server is None:
            raise Refusal("rejected", f"account {account.address} has no smtp_server "
                          "configured")
        self.account = account
        self.server = server
        self.description = str(server)
        self.timeout = timeout
        self.mechanism: Mechanism | None = None
        implicit = server.tls == "implicit"
        self.smtp = aiosmtplib.SMTP(
            hostname=server.host, port=server.port, use_tls=implicit,
            start_tls=not implicit, tls_context=client_tls_context(account.ca_file),
            timeout=timeout, local_hostname=LOCAL_HOSTNAME)

    # -- login.Upstream ------------------------------------------------------------------

    async def connect(self) -> None:
        try:
            await self.smtp.connect()
            await self.smtp.ehlo()
        except aiosmtplib.SMTPResponseException as exc:
            self.close()
            raise UpstreamError(f"{exc.code} {' '.join(exc.message.split())}") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.close()
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            raise UpstreamError(describe_error(cause)) from None
        offered = frozenset(f"AUTH={m.upper()}" for m in self.smtp.server_auth_methods)
        self.mechanism = choose_mechanism(offered, self.account.sasl_mechanism)
        if self.mechanism is None:
            self.close()
            names = " ".join(sorted(m.removeprefix("AUTH=") for m in offered)) or "none"
            raise UpstreamError(f"the server offers no usable OAuth2 mechanism (AUTH {names})")

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
            return None
        return UpstreamRejection(one_line(response), temporary=400 <= response.code < 500)

    def close(self) -> None:
        self.smtp.close()

    # -- relay ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.smtp.is_connected

    @property
    def size_limit(self) -> int | None:
        """The server's SIZE, if it announced one."""
        value = self.smtp.esmtp_extensions.get("size", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    async def command(self, *args: bytes, timeout: float | None = None) -> SMTPResponse:
        try:
            response = await self.smtp.execute_command(
                *args, timeout=self.timeout if timeout is None else timeout)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.close()
            raise UpstreamGone(describe_error(exc)) from None
        if response.code == 421:  # the server is closing the connection
            self.close()
            raise UpstreamGone(one_line(response))
        return response

    async def mail(self, address: str, options: list[str]) -> SMTPResponse:
        # aiosmtpd hands the null reverse-path (bounces, DSNs) over as "<>": wrapped once
        # more it would be "<<>>", which Postfix forgives and stricter servers refuse.
        path = b"<>" if address == "<>" else b"<" + _raw(address) + b">"
        return await self.command(b"MAIL", b"FROM:" + path,
                                  *(o.encode("ascii") for o in options))

    async def rcpt(self, address: str, options: list[str]) -> SMTPResponse:
        return await self.command(b"RCPT", b"TO:<" + _raw(address) + b">",
                                  *(o.encode("ascii") for o in options))

    async def start_data(self) -> SMTPResponse:
        """Send DATA; after a 354 the message goes with ``send`` and ``finish_data``."""
        response = await self.command(b"DATA")
        protocol = self.smtp.protocol
        if response.code == 354 and protocol is not None:
            # aiosmtplib throws away what arrives while it awaits no reply: a server that
            # answers early (a 421 before closing) must still be heard by finish_data.
            protocol._response_pending = True
        return response

    def send(self, data: bytes) -> bool:
        """Write message bytes as they are; True when ``drain`` must be awaited."""
        protocol = self.smtp.protocol
        try:
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("connection lost")
            protocol.write(data)
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.close()
            raise UpstreamGone(describe_error(exc)) from None
        # Set by the transport's pause_writing (also the TLS transport's) above its
        # high-water mark: stop reading the client until the upstream has taken it.
        return protocol._paused

    async def drain(self) -> None:
        protocol = self.smtp.protocol
        try:
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("connection lost")
            await asyncio.wait_for(protocol._drain_helper(), DATA_BLOCK_TIMEOUT)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.close()
            raise UpstreamGone(describe_error(exc)) from None

    async def finish_data(self) -> SMTPResponse:
        """The server's reply to the end of the message (written by ``send``)."""
        protocol = self.smtp.protocol
        try:
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("connection lost")
            response = await protocol.read_response(timeout=DATA_END_TIMEOUT)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.close()
            raise UpstreamGone(describe_error(exc)) from None
        if response.code == 421:
            self.close()
            raise UpstreamGone(one_line(response))
        return response

    async def quit(self) -> None:
        try:
            if self.connected:
                await self.smtp.execute_command(b"QUIT", timeout=5.0)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            self.close()


def _raw(address: str) -> bytes:
    # aiosmtpd decodes arguments as UTF-8 with surrogateescape: this gives the client's bytes.
    return address.encode("utf-8", "surrogateescape")
