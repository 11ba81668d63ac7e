"""One [[accounts]] table: the mailbox, its provider preset and what overrides it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from ..providers import PRESETS, Flow, ProviderName, Server, TlsMode
from .values import HostPort, OAuthUrl, Strict, existing_file, is_loopback_host, parse_hostport


class Account(Strict):
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

