"""The tables of what listens: [imap], [pop3], [smtp], their [tls], [metrics] and [admin]."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from .values import (
    Delivery,
    HostPort,
    OptionalHostPort,
    RequireTls,
    Strict,
    TlsVersion,
    check_tls_name,
    existing_file,
    is_loopback_host,
    parse_hostport,
)


class _TlsListener(Strict):
    """What the three listener tables share: local TLS, the login deadline, connection limits."""

    listen: HostPort
    tls_listen: OptionalHostPort
    require_tls: RequireTls = "auto"
    # Oldest TLS version accepted on this protocol's listeners; "1.0"/"1.1" for old devices.
    tls_min_version: TlsVersion = "1.2"
    # The whole time a client has to log in (seconds; commands such as NOOP do not extend it).
    login_timeout: float = Field(default=60.0, gt=0)
    # Open connections at once, in all and from one client address (0: no limit); one more
    # is refused with a protocol reply and closed.
    max_connections: int = Field(default=1000, ge=0)
    max_connections_per_ip: int = Field(default=512, ge=0)

    @property
    def plain_requires_tls(self) -> bool:
        """Whether the plain listener refuses passwords before STARTTLS."""
        if self.require_tls == "auto":
            return not is_loopback_host(parse_hostport(self.listen)[0])
        return self.require_tls


class ImapListener(_TlsListener):
    listen: HostPort = "127.0.0.1:1143"
    tls_listen: OptionalHostPort = "127.0.0.1:1993"
    # Before login: longest command line and literal a client may send, and how long it may idle.
    max_line: int = Field(default=8192, ge=512)
    max_literal: int = Field(default=8192, ge=64)
    # A logged-in client that reads none of what the server sends for this long is cut off.
    stall_timeout: float = Field(default=60.0, gt=0)
    # After a client login, this many logged-in upstream sessions are made ready for the
    # account's next client login (0: none), each kept at most spare_idle seconds unused.
    spare_sessions: int = Field(default=1, ge=0, le=4)
    spare_idle: float = Field(default=600.0, gt=0, le=1200)


class Pop3Listener(_TlsListener):
    # POP3 lines are limited by the protocol (255 octets), so there is nothing else to set.
    listen: HostPort = "127.0.0.1:1110"
    tls_listen: OptionalHostPort = "127.0.0.1:1995"
    stall_timeout: float = Field(default=60.0, gt=0)


class SmtpListener(_TlsListener):
    listen: HostPort = "127.0.0.1:1587"
    tls_listen: OptionalHostPort = "127.0.0.1:1465"
    # Largest message accepted, in bytes; 0: the upstream server's SIZE.
    max_message_size: int = Field(default=0, ge=0)
    # Seconds a client may stay silent (before and after login) before it is disconnected.
    idle_timeout: float = Field(default=300.0, gt=0)
    # False (default): MAIL is answered at once and goes upstream with the first RCPT (where
    # the server offers PIPELINING), and DATA gets our 354 while the server's is on its way;
    # a refused sender or DATA then comes back at the next reply, in the server's words. True:
    # MAIL and DATA each wait for the server's own reply (two more round trips a message).
    strict_one_to_one: bool = False
    # "relay": a message is sent upstream while the client waits, and the client gets the
    # server's verdict. "queue": the client gets 250 once the message is safely on disk; the
    # outbound queue delivers it (see [queue]). Devices choose for themselves ([[devices]]).
    delivery: Delivery = "relay"
    # Relay: a logged-in upstream session is kept this many seconds after its client left,
    # for the account's next client (one login for many one-message connections); 0: off.
    upstream_pool_idle: float = Field(default=60.0, ge=0)


class TlsSettings(Strict):
    # A certificate (PEM, the chain after it allowed) and its key (PEM, unencrypted; may be in
    # cert_file). Replaced on disk, it is used for new connections without a restart. Without
    # them mailproxy makes its own local CA and certificate in state_dir/tls/.
    cert_file: Path | None = None
    key_file: Path | None = None
    # Names and addresses the generated certificate adds to localhost, 127.0.0.1, ::1 and
    # this machine's host name.
    names: list[Annotated[str, AfterValidator(check_tls_name)]] = []

    @field_validator("cert_file", "key_file")
    @classmethod
    def _existing_file(cls, value: Path | None) -> Path | None:
        return existing_file(value)

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        return self


class MetricsSettings(Strict):
    # Prometheus /metrics, /livez and /readyz on a port of their own; "" (default): off.
    listen: HostPort | Literal[""] = ""


class AdminSettings(Strict):
    # The admin page (accounts at a glance, sign-in from a browser), "host:port"; "" turns it
    # off. It holds what signs accounts in, so off this machine it is served over TLS only.
    listen: str = "127.0.0.1:8025"
    # TLS with the listeners' certificate ([tls]): "auto" (default) on when listen is not a
    # loopback address; true also on loopback; false only on loopback.
    tls: RequireTls = "auto"

    @field_validator("listen")
    @classmethod
    def _hostport(cls, value: str) -> str:
        value = value.strip()
        if value:
            parse_hostport(value)
        return value

    @model_validator(mode="after")
    def _tls_off_loopback(self) -> AdminSettings:
        if self.listen and self.tls is False and not self.loopback:
            raise ValueError(
                f"listen = {self.listen!r} is not a loopback address and tls = false: the "
                "admin page signs accounts in and holds their passwords, so off this machine "
                "it is served over TLS only. Remove 'tls = false' (the page then uses the "
                "listeners' certificate from [tls]), or listen on '127.0.0.1:8025' and reach "
                "it through an SSH tunnel")
        return self

    @property
    def loopback(self) -> bool:
        return bool(self.listen) and is_loopback_host(parse_hostport(self.listen)[0])

    @property
    def use_tls(self) -> bool:
        """Whether the page is served over TLS (``tls``, or "auto" off loopback)."""
        if not self.listen:
            return False
        return not self.loopback if self.tls == "auto" else self.tls
