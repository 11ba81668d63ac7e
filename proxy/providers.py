"""Provider presets: upstream hosts, TLS modes, OAuth2 endpoints and scopes.

Facts from shared/PROTOCOL-NOTES.md. An account of provider ``custom`` gives all of these itself;
any preset value can also be overridden per account.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TlsMode = Literal["implicit", "starttls"]
Flow = Literal["authorization_code", "client_credentials", "device_code", "service_account"]
ProviderName = Literal["gmail", "outlook", "office365", "custom"]


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    tls: TlsMode

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Preset:
    imap: Server
    pop3: Server
    smtp: Server
    authorize_url: str
    token_url: str
    device_authorization_url: str | None
    scopes: tuple[str, ...]
    app_only_scopes: tuple[str, ...] = ()
    default_tenant: str | None = None
    # Recipients per message the provider's SMTP submission accepts.
    smtp_max_recipients: int | None = None
    # Sending limits the provider enforces (it blocks the mailbox past them); the outbound
    # queue paces itself to stay under them.
    max_messages_per_minute: int | None = None
    max_messages_per_day: int | None = None
    max_recipients_per_day: int | None = None
    # Extra authorization request parameters (Google needs offline access to issue a refresh token).
    authorize_params: dict[str, str] = field(default_factory=dict)


_MS_LOGIN = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
_MS_DELEGATED = (
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "https://outlook.office.com/POP.AccessAsUser.All",
    "https://outlook.office.com/SMTP.Send",
    "offline_access",
)

PRESETS: dict[str, Preset] = {
    "gmail": Preset(
        imap=Server("imap.gmail.com", 993, "implicit"),
        pop3=Server("pop.gmail.com", 995, "implicit"),
        smtp=Server("smtp.gmail.com", 465, "implicit"),
        authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
        token_url="https://oauth2.googleapis.com/token",
        # Google's device flow rejects the mail scope.
        device_authorization_url=None,
        scopes=("https://mail.google.com/",),
        authorize_params={"access_type": "offline", "prompt": "consent"},
        smtp_max_recipients=100,
        max_messages_per_day=2000,
    ),
    "office365": Preset(
        imap=Server("outlook.office365.com", 993, "implicit"),
        pop3=Server("outlook.office365.com", 995, "implicit"),
        smtp=Server("smtp.office365.com", 587, "starttls"),
        authorize_url=_MS_LOGIN + "/authorize",
        token_url=_MS_LOGIN + "/token",
        device_authorization_url=_MS_LOGIN + "/devicecode",
        scopes=_MS_DELEGATED,
        app_only_scopes=("https://outlook.office365.com/.default",),
        default_tenant="organizations",
        smtp_max_recipients=500,
        max_messages_per_minute=30,
        max_recipients_per_day=10000,
    ),
    "outlook": Preset(
        imap=Server("outlook.office365.com", 993, "implicit"),
        pop3=Server("outlook.office365.com", 995, "implicit"),
        smtp=Server("smtp-mail.outlook.com", 587, "starttls"),
        authorize_url=_MS_LOGIN + "/authorize",
        token_url=_MS_LOGIN + "/token",
        device_authorization_url=_MS_LOGIN + "/devicecode",
        scopes=_MS_DELEGATED,
        default_tenant="consumers",
        smtp_max_recipients=100,
        # Microsoft's published Outlook.com limit (for Microsoft 365 subscribers; "lower for
        # non-subscribers", unpublished: set max_recipients_per_day lower for a free account).
        max_recipients_per_day=5000,
    ),
}
