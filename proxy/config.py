"""Configuration: a TOML file plus ``MAILPROXY_*`` environment overrides, via pydantic-settings.

``load_config`` is the only entry point; it turns every problem into a ``ConfigError`` whose
message names the file, the key and what is wrong, so the CLI can print it and exit 2.

long: one schema read top to bottom (listeners, accounts, tokens, vault, notify); it is split
by section once the TLS, queue, admin and metrics sections have landed.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import platformdirs
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .providers import PRESETS, Flow, ProviderName, Server, TlsMode

ENV_CONFIG = "MAILPROXY_CONFIG"


class ConfigError(Exception):
    """A configuration problem a person can fix; the message says where and what."""


def parse_hostport(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected 'host:port', got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range 0-65535")
    return host, number


def _check_hostport(value: str) -> str:
    parse_hostport(value)
    return value


HostPort = Annotated[str, AfterValidator(_check_hostport)]


def _check_optional_hostport(value: str) -> str:
    return value and _check_hostport(value)


# "" turns the listener off.
OptionalHostPort = Annotated[str, AfterValidator(_check_optional_hostport)]
# "auto": required when the listener's address is not a loopback address.
RequireTls = Literal["auto"] | bool
TlsVersion = Literal["1.0", "1.1", "1.2", "1.3"]


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_oauth_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme == "https" and parts.hostname:
        return value
    if parts.scheme == "http" and parts.hostname and is_loopback_host(parts.hostname):
        return value  # a token endpoint on this machine (tests, a local broker)
    raise ValueError(f"must be an https:// URL (http:// only on loopback), got {value!r}")


OAuthUrl = Annotated[str, AfterValidator(_check_oauth_url)]


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"\s*(\d+)\s*([KMG]?)i?B?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _duration(value: object) -> object:
    """Seconds, or a string with a unit: "90s", "30m", "12h", "5d"."""
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match is None:
            raise ValueError(f"expected seconds or a duration such as '30m', '12h', '5d', "
                             f"got {value!r}")
        return float(match[1]) * _DURATION_UNITS[match[2]]
    return value


def _byte_size(value: object) -> object:
    """Bytes, or a string with a unit: "512K", "100M", "2G" (powers of 1024)."""
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match is None:
            raise ValueError(f"expected bytes or a size such as '100M', '2G', got {value!r}")
        return int(match[1]) * _SIZE_UNITS[match[2].upper()]
    return value


Duration = Annotated[float, BeforeValidator(_duration), Field(gt=0)]
ByteSize = Annotated[int, BeforeValidator(_byte_size), Field(ge=0)]

Delivery = Literal["relay", "queue"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def existing_file(value: Path | None) -> Path | None:
    """A configured file, ``~`` expanded; it must exist."""
    if value is None:
        return None
    value = value.expanduser()
    if not value.is_file():
        raise ValueError(f"file {str(value)!r} does not exist")
    return value


class _TlsListener(_Strict):
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


class QueueSettings(_Strict):
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


class Device(_Strict):
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


def _check_tls_name(value: str) -> str:
    value = value.strip().rstrip(".")
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(value))
    labels = value.removeprefix("*.").split(".")
    if not value or len(value) > 253 or not all(
            label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
            for label in labels) or labels[-1].isdigit():  # all digits: a mistyped address
        raise ValueError(f"expected a host name or an IP address, got {value!r}")
    return value.lower()


class TlsSettings(_Strict):
    # A certificate (PEM, the chain after it allowed) and its key (PEM, unencrypted; may be in
    # cert_file). Replaced on disk, it is used for new connections without a restart. Without
    # them mailproxy makes its own local CA and certificate in state_dir/tls/.
    cert_file: Path | None = None
    key_file: Path | None = None
    # Names and addresses the generated certificate adds to localhost, 127.0.0.1, ::1 and
    # this machine's host name.
    names: list[Annotated[str, AfterValidator(_check_tls_name)]] = []

    @field_validator("cert_file", "key_file")
    @classmethod
    def _existing_file(cls, value: Path | None) -> Path | None:
        return existing_file(value)

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        return self


class TokenSettings(_Strict):
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


class AuthSettings(_Strict):
    """Password guessing: after a failed login from an address, its next logins wait
    `failure_delay` seconds, doubling per failure up to `failure_delay_max`, one at a time
    (a success resets it). Over the limits within `failure_window` seconds, logins from the
    address, or not yet verified passwords for the account, are refused for the window."""

    failure_delay: float = Field(default=1.0, ge=0)
    failure_delay_max: float = Field(default=15.0, ge=0)
    max_failures_per_ip: int = Field(default=50, ge=1)
    max_failures_per_account: int = Field(default=50, ge=1)
    failure_window: float = Field(default=900.0, gt=0)


class VaultSettings(_Strict):
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


class NotifySettings(_Strict):
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


class MetricsSettings(_Strict):
    # Prometheus /metrics, /livez and /readyz on a port of their own; "" (default): off.
    listen: HostPort | Literal[""] = ""


class AdminSettings(_Strict):
    # The admin page (accounts at a glance, sign-in from a browser), "host:port"; "" turns it
    # off. Loopback only until the listeners can do TLS: it holds what signs accounts in.
    listen: str = "127.0.0.1:8025"

    @field_validator("listen")
    @classmethod
    def _loopback(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return ""
        host, _ = parse_hostport(value)
        if not is_loopback_host(host):
            raise ValueError(f"{value!r} is not a loopback address; the admin page is served "
                             "without TLS, so it listens on this machine only (e.g. "
                             "'127.0.0.1:8025'); use an SSH tunnel to reach it from elsewhere")
        return value


class Account(_Strict):
    address: str
    provider: ProviderName
    client_id: str = ""
    client_secret: SecretStr | None = None
    flow: Flow = "authorization_code"
    # Microsoft tenant: common, organizations, consumers or a tenant id.
    tenant: str | None = None
    # Name sent upstream in the SASL string when it differs from `address` (shared mailboxes).
    upstream_user: str | None = None
    token_url: OAuthUrl | None = None
    authorize_url: OAuthUrl | None = None
    device_authorization_url: OAuthUrl | None = None
    scopes: list[str] | None = None
    imap_server: HostPort | None = None
    imap_tls: TlsMode | None = None
    pop3_server: HostPort | None = None
    pop3_tls: TlsMode | None = None
    smtp_server: HostPort | None = None
    smtp_tls: TlsMode | None = None
    # Recipients per message; default: the provider's limit (none for custom: the server decides).
    smtp_max_recipients: int | None = Field(default=None, ge=1)
    # Sending limits for the outbound queue (0: none); default: the provider's (Microsoft 365:
    # 30 a minute and 10,000 recipients a day; Gmail: 2,000 messages a day).
    max_messages_per_minute: int | None = Field(default=None, ge=0)
    max_messages_per_day: int | None = Field(default=None, ge=0)
    max_recipients_per_day: int | None = Field(default=None, ge=0)
    # A CA bundle to trust for the upstream mail servers (private CA, interception proxy, tests).
    # Certificates are always verified; this only adds trust anchors.
    ca_file: Path | None = None
    sasl_mechanism: Literal["auto", "xoauth2", "oauthbearer"] = "auto"
    # authorization_code: where the provider sends the browser back; default a random free port
    # on 127.0.0.1 (must be registered with the provider when the app is a web app).
    redirect_uri: str | None = None
    # Microsoft certificate credentials instead of a client secret: PEM certificate, and its
    # private key (PEM, unencrypted) when not in the same file.
    client_certificate: Path | None = None
    client_certificate_key: Path | None = None
    # Google Workspace service account key file (JSON) for flow 'service_account'.
    service_account_file: Path | None = None
    # Refresh tokens with a known lifetime (a Google project in "Testing" status: 7 days):
    # notifications warn `[notify] before_deadline` hours before it ends.
    refresh_token_lifetime_days: float | None = Field(default=None, gt=0)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.strip()
        if "@" not in value or any(c.isspace() for c in value):
            raise ValueError(f"expected an e-mail address, got {value!r}")
        return value

    @field_validator("ca_file", "client_certificate", "client_certificate_key",
                     "service_account_file")
    @classmethod
    def _existing_file(cls, value: Path | None) -> Path | None:
        return existing_file(value)

    @field_validator("redirect_uri")
    @classmethod
    def _redirect_uri(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme != "http" or not parts.hostname or not is_loopback_host(parts.hostname):
            raise ValueError("must be a loopback http:// address such as "
                             f"'http://127.0.0.1:8765/', got {value!r}")
        return value

    @model_validator(mode="after")
    def _complete(self) -> Account:
        preset = PRESETS.get(self.provider)
        if preset is None:  # custom: the account gives everything it uses
            if self.token_url is None:
                raise ValueError("provider 'custom' needs token_url")
            if not (self.imap_server or self.pop3_server or self.smtp_server):
                raise ValueError("provider 'custom' needs at least one of imap_server, "
                                 "pop3_server, smtp_server")
            if self.scopes is None:
                raise ValueError("provider 'custom' needs scopes (a list, may be empty)")
        else:
            tenant = self.tenant or preset.default_tenant or ""
            if self.flow == "client_credentials" and self.tenant in (None, "common",
                                                                     "organizations"):
                raise ValueError("flow 'client_credentials' needs `tenant` set to the tenant id")
            if self.token_url is None:
                self.token_url = preset.token_url.format(tenant=tenant)
            if self.authorize_url is None:
                self.authorize_url = preset.authorize_url.format(tenant=tenant)
            if self.device_authorization_url is None and preset.device_authorization_url:
                self.device_authorization_url = preset.device_authorization_url.format(
                    tenant=tenant)
            if self.scopes is None:
                app_only = self.flow == "client_credentials" and preset.app_only_scopes
                self.scopes = list(preset.app_only_scopes if app_only else preset.scopes)
            if self.smtp_max_recipients is None:
                self.smtp_max_recipients = preset.smtp_max_recipients
            for limit in ("max_messages_per_minute", "max_messages_per_day",
                          "max_recipients_per_day"):
                if getattr(self, limit) is None:
                    setattr(self, limit, getattr(preset, limit))
            for proto in ("imap", "pop3", "smtp"):
                server: Server = getattr(preset, proto)
                if getattr(self, f"{proto}_server") is None:
                    setattr(self, f"{proto}_server", f"{server.host}:{server.port}")
                    if getattr(self, f"{proto}_tls") is None:
                        setattr(self, f"{proto}_tls", server.tls)
        if not self.client_id and self.flow != "service_account":
            raise ValueError("client_id is required")
        if self.flow == "service_account" and self.service_account_file is None:
            raise ValueError("flow 'service_account' needs service_account_file (the JSON key "
                             "of a Google Workspace service account with domain-wide delegation)")
        if self.client_certificate_key is not None and self.client_certificate is None:
            raise ValueError("client_certificate_key needs client_certificate")
        if self.client_certificate is not None and self.client_secret is not None:
            raise ValueError("give either client_secret or client_certificate, not both")
        return self

    @property
    def key(self) -> str:
        """The account's identity: the address, case-folded (user names are matched this way)."""
        return self.address.casefold()

    @property
    def sasl_user(self) -> str:
        return self.upstream_user or self.address

    def server(self, proto: Literal["imap", "pop3", "smtp"]) -> Server | None:
        hostport = getattr(self, f"{proto}_server")
        if hostport is None:
            return None
        host, port = parse_hostport(hostport)
        tls: TlsMode = getattr(self, f"{proto}_tls") or ("starttls" if port in (
            143, 110, 587, 25) else "implicit")
        return Server(host, port, tls)


def _default_state_dir() -> Path:
    return platformdirs.user_state_path("mailproxy")


def default_config_path() -> Path:
    return platformdirs.user_config_path("mailproxy") / "config.toml"


_toml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("toml", default=None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MAILPROXY_", env_nested_delimiter="__", extra="forbid",
    )

    state_dir: Path = Field(default_factory=_default_state_dir)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # "text" (one readable line an event) or "json" (one object a line, for log collectors).
    log_format: Literal["text", "json"] = "text"
    imap: ImapListener = ImapListener()
    pop3: Pop3Listener = Pop3Listener()
    smtp: SmtpListener = SmtpListener()
    tls: TlsSettings = TlsSettings()
    tokens: TokenSettings = TokenSettings()
    vault: VaultSettings = VaultSettings()
    notify: NotifySettings = NotifySettings()
    metrics: MetricsSettings = MetricsSettings()
    # Seconds open sessions get to finish at SIGTERM/SIGINT before they are cut off.
    shutdown_grace: float = Field(default=10.0, ge=0, le=15)
    admin: AdminSettings = AdminSettings()
    queue: QueueSettings = QueueSettings()
    auth: AuthSettings = AuthSettings()
    # The daemon's status socket (owner-only); default: control.sock in state_dir.
    control_socket: Path | None = None
    accounts: list[Account] = []
    devices: list[Device] = []

    @field_validator("state_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _unique(self) -> Settings:
        seen: set[str] = set()
        for account in self.accounts:
            if account.key in seen:
                raise ValueError(f"account {account.address!r} is listed twice")
            seen.add(account.key)
        names: set[str] = set()
        for device in self.devices:
            if device.name.casefold() in names:
                raise ValueError(f"device {device.name!r} is listed twice")
            names.add(device.name.casefold())
            owner = self.account(device.account)
            if owner is None:
                raise ValueError(f"device {device.name!r}: account {device.account!r} is not "
                                 "one of the [[accounts]] addresses")
            if not device.senders:
                device.senders = [owner.address]
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _toml_path.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @property
    def queue_dir(self) -> Path:
        return self.queue.dir or self.state_dir / "queue"

    def device_for(self, host: str) -> Device | None:
        """The device rule for a connection from ``host`` (the first that matches)."""
        for device in self.devices:
            if device.matches(host):
                return device
        return None

    @property
    def control_path(self) -> Path:
        return self.control_socket or self.state_dir / "control.sock"

    def account(self, login: str) -> Account | None:
        wanted = login.casefold()
        for account in self.accounts:
            if account.key == wanted:
                return account
        return None


def _describe(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


# MAILPROXY_ variables that are not settings: the file to read, and those the [notify] command
# gets (a hook that runs mailproxy itself passes them on).
_ENV_NOT_SETTINGS = {"MAILPROXY_CONFIG", "MAILPROXY_ACCOUNT", "MAILPROXY_EVENT",
                     "MAILPROXY_REASON", "MAILPROXY_TIME", "MAILPROXY_DEADLINE"}


def _env_source(loc: tuple[int | str, ...]) -> str | None:
    """The environment variable that set the value at ``loc``, if one did."""
    names = [p for p in loc if isinstance(p, str)][:2]
    env = {k.upper() for k in os.environ}
    for n in range(len(names), 0, -1):
        name = "MAILPROXY_" + "__".join(names[:n]).upper()
        if name in env:
            return name
    return None


def unknown_env_variables(settings: Settings) -> list[str]:
    """``MAILPROXY_*`` variables that set nothing (misspelt?), except the ones that name a
    master key (``env:`` sources) and those that are not settings."""
    known = set(_ENV_NOT_SETTINGS)
    for name, info in Settings.model_fields.items():
        top = f"MAILPROXY_{name.upper()}"
        known.add(top)
        model = info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            known.update(f"{top}__{sub.upper()}" for sub in model.model_fields)
    master = settings.vault.master_key or ""
    if master.startswith("env:"):
        known.add(master[4:].upper())
    return sorted(k for k in os.environ
                  if k.upper().startswith("MAILPROXY_") and k.upper() not in known)


def _format_errors(exc: ValidationError, data: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(err["loc"])
        source = _env_source(loc)
        if source is not None:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {_describe(loc)}: {msg} (set by the environment variable {source})")
            continue
        if loc and loc[0] in ("accounts", "devices") and len(loc) > 1 \
                and isinstance(loc[1], int):
            what, field = ("account", "address") if loc[0] == "accounts" else ("device", "name")
            try:
                name = data[loc[0]][loc[1]].get(field)
            except (KeyError, IndexError, AttributeError, TypeError):
                name = None
            if name:
                loc = loc[:2] + tuple(p for p in loc[2:] if p not in ("function-after",))
                prefix = f"{_describe(loc)} ({what} {name!r})"
            else:
                prefix = _describe(loc)
        else:
            prefix = _describe(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        lines.append(f"  {prefix}: {msg}")
    return "\n".join(lines)


def resolve_config_path(explicit: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """The file to read and whether the user named it (a named file must exist)."""
    if explicit is not None:
        return Path(explicit).expanduser(), True
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG]).expanduser(), True
    return default_config_path(), False


def load_config(explicit: str | os.PathLike[str] | None = None) -> tuple[Settings, Path | None]:
    """Load the settings; returns them and the file read (None: built-in defaults)."""
    path, named = resolve_config_path(explicit)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        used: Path | None = path
    elif named:
        raise ConfigError(f"{path}: no such file")
    else:
        used = None
    token = _toml_path.set(used)
    try:
        settings = Settings()
    except ValidationError as exc:
        where = str(used) if used else "configuration (environment)"
        details = _format_errors(exc, data)
        if used and all("(set by the environment variable" in x for x in details.splitlines()):
            where = "configuration (environment)"  # the file is not to blame
        raise ConfigError(f"{where}: invalid configuration:\n{details}") from None
    finally:
        _toml_path.reset(token)
    return settings, used
