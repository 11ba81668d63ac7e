"""Configuration: a TOML file plus ``MAILPROXY_*`` environment overrides, via pydantic-settings.

``load_config`` is the only entry point; it turns every problem into a ``ConfigError`` whose
message names the file, the key and what is wrong, so the CLI can print it and exit 2. The
schema is split by table: ``values`` (value types), ``listeners``, ``sections``, ``account``,
``settings`` (the whole), ``load`` (files, environment, error messages).
"""

from .account import Account
from .listeners import (
    AdminSettings,
    ImapListener,
    MetricsSettings,
    Pop3Listener,
    SmtpListener,
    TlsSettings,
)
from .load import ENV_CONFIG, load_config, resolve_config_path, unknown_env_variables
from .sections import (
    AuthSettings,
    Device,
    NotifySettings,
    QueueSettings,
    TokenSettings,
    VaultSettings,
)
from .settings import Settings, default_config_path
from .values import (
    ByteSize,
    ConfigError,
    Delivery,
    Duration,
    HostPort,
    OptionalHostPort,
    RequireTls,
    TlsVersion,
    existing_file,
    is_loopback_host,
    parse_hostport,
)

__all__ = [
    "ENV_CONFIG", "Account", "AdminSettings", "AuthSettings", "ByteSize", "ConfigError",
    "Delivery", "Device", "Duration", "HostPort", "ImapListener", "MetricsSettings",
    "NotifySettings", "OptionalHostPort", "Pop3Listener", "QueueSettings", "RequireTls",
    "Settings", "SmtpListener", "TlsSettings", "TlsVersion", "TokenSettings", "VaultSettings",
    "default_config_path", "existing_file", "is_loopback_host", "load_config",
    "parse_hostport", "resolve_config_path", "unknown_env_variables",
]
