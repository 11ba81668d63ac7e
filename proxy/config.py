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
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import platformdirs
from pydantic import (
    AfterValidator,
    BaseModel,
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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _TlsListener(_Strict):
    """What the three listener tables share about local TLS."""

    listen: HostPort
    tls_listen: OptionalHostPort
    require_tls: RequireTls = "auto"
    # Oldest TLS version accepted on this protocol's listeners; "1.0"/"1.1" for old devices.
    tls_min_version: TlsVersion = "1.2"

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
    login_timeout: float = Field(default=60.0, gt=0)


class Pop3Listener(_TlsListener):
    # POP3 lines are limited by the protocol (255 octets), so there is nothing else to set.
    listen: HostPort = "127.0.0.1:1110"
    tls_listen: OptionalHostPort = "127.0.0.1:1995"
    login_timeout: float = Field(default=60.0, gt=0)


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
        if value is None:
            return None
        value = value.expanduser()
        if not value.is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value

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
        if value is None:
            return None
        value = value.expanduser()
        if not value.is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value

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
    imap: ImapListener = ImapListener()
    pop3: Pop3Listener = Pop3Listener()
    smtp: SmtpListener = SmtpListener()
    tls: TlsSettings = TlsSettings()
    tokens: TokenSettings = TokenSettings()
    vault: VaultSettings = VaultSettings()
    notify: NotifySettings = NotifySettings()
    # The daemon's status socket (owner-only); default: control.sock in state_dir.
    control_socket: Path | None = None
    accounts: list[Account] = []

    @field_validator("state_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _unique(self) -> Settings:
        seen: set[str] = set()
        for account in self.accounts:
            if account.key in seen:
                raise ValueError(f"account {account.address!r} is listed twice")
            seen.add(account.key)
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


def _format_errors(exc: ValidationError, data: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(err["loc"])
        if loc and loc[0] == "accounts" and len(loc) > 1 and isinstance(loc[1], int):
            try:
                address = data["accounts"][loc[1]].get("address")
            except (KeyError, IndexError, AttributeError, TypeError):
                address = None
            if address:
                loc = loc[:2] + tuple(p for p in loc[2:] if p not in ("function-after",))
                prefix = f"{_describe(loc)} (account {address!r})"
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
        raise ConfigError(f"{where}: invalid configuration:\n{_format_errors(exc, data)}") from None
    finally:
        _toml_path.reset(token)
    return settings, used
