"""An IMAP client session: run the local core, log in upstream, then splice."""

from __future__ import annotations

from .config import Account, Settings
from .core.imap import ImapLocal
from .core.imap_upstream import ImapUpstream
from .login import Gate, Refusal
from .net import Conn
from .session import serve_client
from .upstream import UPSTREAM_TIMEOUT, NoServer, UpstreamSession, server_for

_CODES = {
    "credentials": "NO [AUTHENTICATIONFAILED]",
    "authorization": "NO [AUTHENTICATIONFAILED]",
    "rejected": "NO [AUTHENTICATIONFAILED]",
    "unavailable": "NO [UNAVAILABLE]",
}


class ImapUpstreamSession(UpstreamSession):
    """Upstream IMAP login for one account (the ``login.Upstream`` interface)."""

    def __init__(self, account: Account, timeout: float = UPSTREAM_TIMEOUT) -> None:
        server = server_for(account, "imap")
        core = ImapUpstream(account.sasl_user, starttls=server.tls == "starttls",
                            mechanism=account.sasl_mechanism, host=server.host, port=server.port)
        super().__init__(server, core, account.ca_file, timeout)


async def imap_session(gate: Gate, settings: Settings, client: Conn) -> None:
    limits = settings.imap
    core = ImapLocal(max_line=limits.max_line, max_literal=limits.max_literal)
    await serve_client(gate, client, core, proto="imap", login_timeout=limits.login_timeout,
                       make_upstream=ImapUpstreamSession,
                       reply_for=_reply)


def _reply(refusal: Refusal) -> str:
    # A configuration gap: no password or token will fix it.
    code = "NO [CANNOT]" if isinstance(refusal, NoServer) else _CODES[refusal.kind]
    return f"{code} {refusal.text}"
