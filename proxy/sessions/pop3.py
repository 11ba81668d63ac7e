"""The POP3 session shell: the local POP3 core, the upstream POP3 login, the POP3 replies
to a refused login."""

from __future__ import annotations

import logging

from ..config import Settings
from ..core.pop3 import Pop3Local
from ..core.pop3_upstream import Pop3Upstream
from ..login import Gate, Refusal
from ..net import Conn
from ..tls.listener import ClientTls
from .client import serve_client
from .upstream import NoServer, UpstreamSession

log = logging.getLogger("mailproxy.pop3")

# RFC 3206 response codes: [AUTH] tells the client the credentials are at fault (ask the
# person), [SYS/TEMP] that it should just try again later.
_CODES = {
    "credentials": "-ERR [AUTH]",
    "authorization": "-ERR [AUTH]",
    "rejected": "-ERR [AUTH]",
    "unavailable": "-ERR [SYS/TEMP]",
    "misconfigured": "-ERR [SYS/PERM]",
}


class Pop3UpstreamSession(UpstreamSession):
    """Upstream POP3 login for one account."""

    proto = "pop3"
    core_type = Pop3Upstream


def _reply(refusal: Refusal) -> str:
    # A configuration gap is permanent and not the password's fault: [SYS/PERM].
    if isinstance(refusal, NoServer):
        log.warning("pop3 login refused: %s", refusal.text)
    code = "-ERR [SYS/PERM]" if isinstance(refusal, NoServer) else _CODES[refusal.kind]
    return f"{code} {refusal.text}"


async def pop3_session(gate: Gate, settings: Settings, client: Conn,
                       tls: ClientTls | None = None) -> None:
    core = Pop3Local(tls=tls.offer() if tls else None)
    await serve_client(gate, client, core, proto="pop3",
                       login_timeout=settings.pop3.login_timeout,
                       make_upstream=Pop3UpstreamSession, reply_for=_reply,
                       stall_timeout=settings.pop3.stall_timeout, tls=tls)
