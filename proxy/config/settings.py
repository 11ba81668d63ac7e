"""The whole configuration (``Settings``): every table, read from TOML and ``MAILPROXY_*``."""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .account import Account
from .listeners import (
    AdminSettings,
    ImapListener,
    MetricsSettings,
    Pop3Listener,
    SmtpListener,
    TlsSettings,
)
from .sections import (
    AuthSettings,
    Device,
    NotifySettings,
    QueueSettings,
    TokenSettings,
    VaultSettings,
)


def _default_state_dir() -> Path:
    return platformdirs.user_state_path("mailproxy")


def default_config_path() -> Path:
    return platformdirs.user_config_path("mailproxy") / "config.toml"


toml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("toml", default=None)


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
        path = toml_path.get()
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

