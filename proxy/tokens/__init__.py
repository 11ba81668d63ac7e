"""OAuth2 access tokens for upstream logins: the manager, its errors and the state store."""

from .errors import AuthorizationRequired, TokenError, TokenUnavailable
from .manager import AccessToken, TokenManager
from .store import FileTokenStore, TokenState, TokenStore

__all__ = [
    "AccessToken",
    "AuthorizationRequired",
    "FileTokenStore",
    "TokenError",
    "TokenManager",
    "TokenState",
    "TokenStore",
    "TokenUnavailable",
]
