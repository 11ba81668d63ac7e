"""OAuth2 access tokens for upstream logins: the manager (``.manager``), the flows of a first
sign-in (``.flows``); the vault is ``proxy.vault``. This package root is light (no authlib or
httpx): the errors and the store interface only."""

from .errors import AuthorizationRequired, FlowError, TokenError, TokenUnavailable
from .store import FileTokenStore, StoreError, StoreLocked, TokenState, TokenStore

__all__ = [
    "AuthorizationRequired",
    "FileTokenStore",
    "FlowError",
    "StoreError",
    "StoreLocked",
    "TokenError",
    "TokenState",
    "TokenStore",
    "TokenUnavailable",
]
