"""The client side of a session, for any protocol with a sans-IO local core: answer the
pre-login dialogue, log in upstream through the gate, then splice."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

from ..config import Account
from ..core.events import AcceptTls, Close, Event, LoginRequest, Send
from ..login import Gate, Refusal, Spares
from ..net import Conn, peer_host, splice
from ..tls.listener import ClientTls
from .dialogue import masked
from .upstream import UpstreamSession

log = logging.getLogger("mailproxy.session")


class LocalCore(Protocol):
    """What ``ImapLocal`` and ``Pop3Local`` offer the shell."""

    def greeting(self) -> bytes: ...

    def receive(self, data: bytes) -> list[Event]: ...

    def timeout(self) -> list[Event]: ...

    def login_rejected(self, reply: str) -> list[Event]: ...

    def login_accepted(self, capabilities: str | None) -> tuple[bytes, bytes]: ...

    def tls_established(self) -> list[Event]: ...


async def serve_client(gate: Gate, client: Conn, core: LocalCore, *, proto: str,
                       login_timeout: float,
                       make_upstream: Callable[[Account], UpstreamSession],
                       reply_for: Callable[[Refusal], str],
                       stall_timeout: float | None = None, tls: ClientTls | None = None,
                       spares: Spares | None = None) -> None:
    """``login_timeout``: the whole time the client has to log in (commands do not extend
    it); ``stall_timeout``: how long a logged-in client may leave our replies unread; ``tls``:
    the listener's TLS (implicit: the handshake comes first); ``spares``: logged-in upstream
    sessions ready for a client whose password is checked."""
    if tls is not None and tls.implicit and not await tls.handshake(client, proto):
        return
    greeting = core.greeting()
    log.debug("S: %s", greeting[:200].decode("utf-8", "replace").rstrip())
    client.write(greeting)
    deadline = asyncio.get_running_loop().time() + login_timeout
    peer = peer_host(client)
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                data = await client.recv()
        except TimeoutError:
            events = core.timeout()
        else:
            if not data:
                return
            if log.isEnabledFor(logging.DEBUG):
                log.debug("C: %s", masked(proto, data))
            events = core.receive(data)
        queue = deque(events)
        while queue:
            event = queue.popleft()
            if isinstance(event, Send):
                log.debug("S: %s", event.data[:200].decode("utf-8", "replace").rstrip())
                client.write(event.data)
            elif isinstance(event, Close):
                client.close()
                return
            elif isinstance(event, AcceptTls):
                assert tls is not None  # a core offers STARTTLS only when given TLS
                if not await tls.handshake(client, proto, reply=event.reply,
                                           dropped=event.dropped):
                    return
                queue.extend(core.tls_established())
            elif isinstance(event, LoginRequest):
                try:
                    _, upstream = await gate.log_in(
                        proto, event.username, event.password, make_upstream, peer=peer,
                        spares=spares, deadline=deadline)
                except Refusal as refusal:
                    queue.extend(core.login_rejected(reply_for(refusal)))
                    continue
                assert isinstance(upstream, UpstreamSession)
                assert upstream.conn is not None and upstream.logged_in is not None
                reply, trailing = core.login_accepted(upstream.logged_in.capabilities)
                client.write(reply)
                client.stall_timeout = stall_timeout
                await splice(client, upstream.conn, upstream.logged_in.trailing, trailing)
                return
