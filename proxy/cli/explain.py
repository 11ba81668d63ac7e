"""Provider errors people actually meet, explained with the fix (for ``mailproxy check``).

The texts the proxy already gives elsewhere are reused: the SMTP AUTH one from
``proxy.smtp.replies``, the app-registration AADSTS hints from the token flows.
"""

from __future__ import annotations

import re

from ..config import Account
from ..smtp.replies import MICROSOFT_SMTP_AUTH_DISABLED
from ..tokens.flows.exchange import _AADSTS_HINTS

_REAUTHORIZE = "sign in again with `mailproxy authorize {address}`"

# Microsoft's token endpoint: the codes whose fix is not in the app registration.
_AADSTS_GRANT = {
    "AADSTS70000": "the refresh token is no longer valid (revoked, or issued for other scopes); "
                   + _REAUTHORIZE,
    "AADSTS700082": "the refresh token expired (unused for 90 days); " + _REAUTHORIZE,
    "AADSTS50173": "the refresh token was revoked (a password change or an administrator "
                   "revoked the sessions); " + _REAUTHORIZE,
    "AADSTS50076": "the tenant requires multi-factor authentication for this sign-in; "
                   + _REAUTHORIZE + " (interactively)",
    "AADSTS70043": "a Conditional Access sign-in frequency policy ended the session; "
                   + _REAUTHORIZE + ", or ask the administrator to exempt the app",
}

_SMTP = (
    (re.compile(r"\b5\.7\.139\b"), MICROSOFT_SMTP_AUTH_DISABLED),
    (re.compile(r"\b5\.7\.3\b"),
     "Microsoft refused the token: usually a wrong scope or audience (IMAP/POP/SMTP tokens must "
     "be for https://outlook.office.com/ or https://outlook.office365.com/, a Graph token "
     "fails), consent given by another account, or (app-only) a service principal registered "
     "with the app registration's object id instead of the enterprise application's."),
    (re.compile(r"\b5\.7\.60\b"),
     "the mailbox may not send as that address: use the account's own address as the sender, "
     "or have an administrator grant SendAs (Add-RecipientPermission <address> -AccessRights "
     "SendAs -Trustee <mailbox>)."),
    (re.compile(r"\b5\.7\.30\b"),
     "Microsoft no longer accepts passwords for SMTP client submission: the client must send "
     "through mailproxy's local SMTP listener, which logs in with OAuth2, not to "
     "smtp.office365.com directly."),
)


def explain(text: str, account: Account) -> str | None:
    """The fix for a provider's error text, or None when it is not one we know."""
    for pattern, fix in _SMTP:
        if pattern.search(text):
            return fix
    for code, fix in _AADSTS_GRANT.items():
        if re.search(rf"\b{code}\b", text):
            return fix.format(address=account.address)
    for code, fix in _AADSTS_HINTS.items():
        if re.search(rf"\b{code}\b", text):
            return fix
    if "invalid_grant" in text:
        fix = "the refresh token was revoked or has expired; " + _REAUTHORIZE.format(
            address=account.address)
        if account.provider == "gmail":
            fix += (". A Google project in \"Testing\" status issues refresh tokens that die "
                    "after 7 days: publish the app (OAuth consent screen > Publish app), or set "
                    "refresh_token_lifetime_days = 7 to be warned before each expiry")
        return fix
    if "interaction_required" in text or "consent_required" in text:
        return "the provider requires an interactive sign-in or consent; " + \
            _REAUTHORIZE.format(address=account.address)
    return None
