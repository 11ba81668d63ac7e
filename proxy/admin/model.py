"""What the admin page shows and asks for, as plain data, and the one interface (``Backend``)
through which it reaches the daemon. ``proxy.admin.host`` implements it; tests may fake it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

# The control socket command that hands out a sign-in link (``mailproxy admin``); the answer
# is {"url": ..., "expires_in": seconds} or {"error": ...}; over TLS also "certificates" (one
# "KEY SHA-256 FINGERPRINT" line per certificate served) and "local_ca" (true when browsers
# must trust mailproxy's own CA).
LINK_COMMAND = "admin-link"
# A browser sign-in started on the page waits this long for the provider's redirect (and
# holds the account's sign-in lock meanwhile, unless cancelled on the page).
CODE_SIGNIN_LIFETIME = 15 * 60.0

Flow = Literal["authorization_code", "device_code", "client_credentials", "service_account"]
VaultState = Literal["open", "locked", "missing", "unknown"]
# What storing a new grant needs from the person: nothing (the vault is open or a master key
# opens it), a new local password (no vault yet), or a current one (a locked vault; a new one
# there replaces the vault and the account's other passwords stop working).
PasswordNeed = Literal["none", "new", "current"]


def free_label(taken: list[str]) -> str:
    """The first ``password-N`` not yet taken (as ``mailproxy password add`` names them)."""
    n = len(taken) + 1
    while f"password-{n}" in taken:
        n += 1
    return f"password-{n}"


class AdminError(Exception):
    """An action failed; the text says why and what to do, and holds no secret."""


@dataclass(frozen=True)
class Notice:
    event: str
    at: float


@dataclass(frozen=True)
class AccountView:
    """One account as the token manager knows it (the control socket's status, plus config)."""

    key: str
    address: str
    provider: str
    flow: Flow
    authorized: bool
    reason: str | None  # why not authorized
    vault: VaultState
    access_token_valid: bool = False
    expires_at: float | None = None
    last_refresh: float | None = None
    next_refresh: float | None = None
    refreshing: bool = False
    last_result: str | None = None
    last_error: str | None = None
    failures: int = 0
    passwords: int = 0
    master_key_slot: bool = False
    notices: tuple[Notice, ...] = ()
    queued: int = 0  # messages in the outbound queue
    queue_oldest: float | None = None  # when the oldest of them was received
    queue_error: str | None = None  # the last delivery error

    @property
    def app_only(self) -> bool:
        return self.flow in ("client_credentials", "service_account")


@dataclass(frozen=True)
class QueuedView:
    """One message in the outbound queue."""

    id: str
    account: str  # the account's key
    sender: str  # "" for the null sender (a delivery status notification)
    recipients: tuple[str, ...]
    size: int
    received: float
    attempts: int
    next_attempt: float
    last_error: str | None
    delivering: bool
    dsn: bool


@dataclass(frozen=True)
class PasswordView:
    label: str
    kind: Literal["password", "master", "legacy"]
    created: float


@dataclass(frozen=True)
class DeviceCodeView:
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_at: float


@dataclass(frozen=True)
class CertificateView:
    """One certificate of the listeners (``mailproxy tls info``'s fields)."""

    role: Literal["served", "chain", "ca"]  # a leaf served, its chain, mailproxy's own CA
    path: str
    subject: str
    issuer: str
    names: tuple[str, ...]
    not_before: float
    not_after: float
    key: str
    sha256: str  # "AB:CD:..."


@dataclass(frozen=True)
class TlsView:
    generated: bool  # mailproxy made its own CA (no [tls] cert_file): it can be downloaded
    certificates: tuple[CertificateView, ...] = ()
    error: str | None = None  # why the certificates cannot be shown

    @property
    def served(self) -> list[CertificateView]:
        return [c for c in self.certificates if c.role != "ca"]

    @property
    def ca(self) -> CertificateView | None:
        return next((c for c in self.certificates if c.role == "ca"), None)


class Held(Protocol):
    """An account's sign-in lock, held until released."""

    def release(self) -> None: ...


@dataclass(frozen=True)
class SignedIn:
    """A stored grant: what to tell the person."""

    message: str
    replaced_passwords: int = 0  # earlier local passwords that no longer work
    notes: tuple[str, ...] = field(default=())


class Backend(Protocol):
    """The daemon as the admin page sees it. Blocking work happens behind these calls."""

    version: str
    pid: int
    started: float

    def clock(self) -> float: ...

    async def accounts(self) -> list[AccountView]: ...

    async def hold_sign_in(self, key: str) -> Held:
        """The account's sign-in lock (the one ``mailproxy authorize`` takes), at once;
        AdminError saying who holds it otherwise."""
        ...

    async def tls(self) -> TlsView:
        """The listeners' certificates now (read from disk)."""
        ...

    async def local_ca(self) -> str:
        """mailproxy's own CA certificate in PEM; AdminError when there is none."""
        ...

    async def password_need(self, key: str) -> PasswordNeed: ...

    def authorization_url(self, key: str, redirect_uri: str, state: str,
                          code_verifier: str) -> str: ...

    async def sign_in_with_code(self, key: str, code: str, redirect_uri: str,
                                code_verifier: str, password: str | None) -> SignedIn: ...

    async def sign_in_with_device(self, key: str, show: Callable[[DeviceCodeView], None],
                                  password: str | None) -> SignedIn: ...

    async def sign_in_app(self, key: str, password: str | None) -> SignedIn:
        """client_credentials / service_account: one token request, stored like a sign-in."""
        ...

    async def passwords(self, key: str) -> list[PasswordView]: ...

    async def add_password(self, key: str, label: str, password: str) -> None: ...

    async def remove_password(self, key: str, label: str) -> None: ...

    async def queue(self) -> list[QueuedView] | None:
        """The outbound queue in arrival order; None when this daemon has no queue (none
        configured and none on disk)."""
        ...

    async def queue_retry(self, message_id: str | None, account: str | None) -> int:
        """Make one message (``message_id``) or every message of ``account`` due now and
        wake the delivery worker; how many there were. AdminError: no such message."""
        ...

    async def queue_delete(self, message_id: str) -> QueuedView:
        """Remove a message without sending it (no bounce). AdminError: no such message."""
        ...
