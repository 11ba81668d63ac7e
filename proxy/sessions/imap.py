"""The IMAP session shell: the local IMAP core, the upstream IMAP login, the IMAP replies
to a refused login."""

from __future__ import annotations

from ..config import Settings
from ..core.imap import ImapLocal
from ..core.imap_upstream import ImapUpstream
from ..login import Gate, Refusal, Spares
from ..net import Conn
from ..tls.listener import ClientTls
from .client import serve_client
from .upstream import NoServer, UpstreamSession

_CODES = {
    "credentials": "NO [AUTHENTICATIONFAILED]",
    "authorization": "NO [AUTHENTICATIONFAILED]",
    "rejected": "NO [AUTHENTICATIONFAILED]",
    "unavailable": "NO [UNAVAILABLE]",
    "misconfigured": "NO [CANNOT]",
}


class ImapUpstreamSession(UpstreamSession):
    """Upstream IMAP login for one account."""

    proto = "imap"
    core_type = ImapUpstream


async def imap_session(gate: Gate, settings: Settings, client: Conn,
                       tls: ClientTls | None = None, *, spares: Spares | None = None) -> None:
    limits = settings.imap
    core = ImapLocal(max_line=limits.max_line, max_literal=limits.max_literal,
                     tls=tls.offer() if tls else None)
    await serve_client(gate, client, core, proto="imap", login_timeout=limits.login_timeout,
                       make_upstream=ImapUpstreamSession,
                       reply_for=_reply, stall_timeout=limits.stall_timeout, tls=tls,
                       spares=spares)


def _reply(refusal: Refusal) -> str:
    # A configuration gap: no password or token will fix it.
    code = "NO [CANNOT]" if isinstance(refusal, NoServer) else _CODES[refusal.kind]
    return f"{code} {refusal.text}"
