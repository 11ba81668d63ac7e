"""The daemon's other tables: [queue], [[devices]], [tokens], [auth], [vault], [notify]."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, field_validator

from .values import ByteSize, Delivery, Duration, OAuthUrl, Strict


class QueueSettings(Strict):
    # The spool and its index; default: "queue" in state_dir.
    dir: Path | None = None
    # How long a message is retried before it bounces (seconds, or "5d", "12h", ...).
    lifetime: Duration = 5 * 86400.0
    # Longest wait between tries; the wait doubles from a minute up to this.
    max_backoff: Duration = 3600.0
    # Bytes on disk the queue may hold ("500M", "2G"; 0: no limit); past it, and below
    # `min_free` free space on its disk, new messages get 452 and wait at the client.
    max_size: ByteSize = 1024**3
    min_free: ByteSize = 100 * 1024**2

    @field_validator("dir")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()


class Device(Strict):
    """A device that cannot log in (printer, scanner): trusted by the network it comes from."""

    name: str
    # Addresses or networks (CIDR) the device connects from.
    networks: list[str]
    # The [[accounts]] address it sends as.
    account: str
    # Envelope senders it may use; default: the account's address.
    senders: list[str] = []
    delivery: Delivery = "queue"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one address or network (CIDR)")
        out = []
        for item in value:
            try:
                out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network such as "
                                 "'192.168.1.20' or '192.168.1.0/24'") from None
        return out

    @field_validator("senders")
    @classmethod
    def _senders(cls, value: list[str]) -> list[str]:
        for sender in value:
            if "@" not in sender or any(c.isspace() or c in "<>" for c in sender):
                raise ValueError(f"expected an e-mail address, got {sender!r}")
        return value

    def matches(self, host: str) -> bool:
        """True when a connection from ``host`` (an IP address) is this device's."""
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in ipaddress.ip_network(net) for net in self.networks)

    def allows_sender(self, sender: str) -> bool:
        wanted = sender.casefold()
        return any(s.casefold() == wanted for s in self.senders)


class TokenSettings(Strict):
    # Refresh this many seconds before an access token expires, minus up to `jitter` seconds.
    refresh_before: float = Field(default=300.0, ge=0)
    jitter: float = Field(default=60.0, ge=0)
    # Per token request, and how often transient failures (network, 5xx, 429) are retried.
    request_timeout: float = Field(default=20.0, gt=0)
    retries: int = Field(default=3, ge=0)
    # Refresh at least this often even when no client connects, so refresh tokens that die when
    # unused (Microsoft: 90 days) stay alive; 0 turns it off.
    keepalive_days: float = Field(default=7.0, ge=0)
    # How long a client login waits for a token; within `failure_memory` seconds of such a
    # failure, logins are answered "try again later" at once while a request is still trying
    # (the background refresher keeps trying).
    login_timeout: float = Field(default=10.0, gt=0)
    failure_memory: float = Field(default=30.0, ge=0)


class AuthSettings(Strict):
    """Password guessing: after a failed login from an address, its next logins wait
    `failure_delay` seconds, doubling per failure up to `failure_delay_max`, one at a time
    (a success resets it). Over the limits within `failure_window` seconds, logins from the
    address, or not yet verified passwords for the account, are refused for the window."""

    failure_delay: float = Field(default=1.0, ge=0)
    failure_delay_max: float = Field(default=15.0, ge=0)
    max_failures_per_ip: int = Field(default=50, ge=1)
    max_failures_per_account: int = Field(default=50, ge=1)
    failure_window: float = Field(default=900.0, gt=0)


class VaultSettings(Strict):
    # Where the master key comes from, if any: "credential:NAME" (systemd LoadCredential=),
    # "file:/path", "env:VARIABLE" or "keyring:SERVICE". With it, tokens are refreshed from
    # start-up; without it, from an account's first successful client login.
    master_key: str | None = None

    @field_validator("master_key")
    @classmethod
    def _source(cls, value: str | None) -> str | None:
        if value is None:
            return None
        kind, sep, rest = value.partition(":")
        if not sep or kind not in ("credential", "file", "env", "keyring") or not rest:
            raise ValueError("expected 'credential:NAME', 'file:/path', 'env:VARIABLE' or "
                             f"'keyring:SERVICE', got {value!r}")
        return value


class NotifySettings(Strict):
    # Run on each event with MAILPROXY_ACCOUNT, MAILPROXY_EVENT, MAILPROXY_REASON (and more) set.
    command: str | None = None
    # POST a JSON object {account, event, reason, ...} here.
    webhook: OAuthUrl | None = None
    # Hours before a known refresh token deadline to warn.
    before_deadline: float = Field(default=24.0, ge=0)
    # Consecutive failed background refreshes before "refresh_failing" is sent.
    failure_threshold: int = Field(default=3, ge=1)
    timeout: float = Field(default=10.0, gt=0)
    # A CA bundle to trust for the webhook, besides the system's.
    ca_file: Path | None = None

    @field_validator("ca_file")
    @classmethod
    def _existing(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return None if value is None else value.expanduser()

