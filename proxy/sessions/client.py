"""The client side of a session, for any protocol with a sans-IO local core: answer the
pre-login dialogue, log in upstream through the gate, then splice."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol

from ..config import Account
from ..core.events import AcceptTls, Close, Event, LoginRequest, Send
from ..login import Gate, Refusal
from ..net import Conn, splice
from ..tls.listener import ClientTls
from .upstream import UpstreamSession


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
                       reply_for: Callable[[Refusal], str], tls: ClientTls | None = None) -> None:
    if tls is not None and tls.implicit and not await tls.handshake(client, proto):
        return
    client.write(core.greeting())
    while True:
        try:
            async with asyncio.timeout(login_timeout):
                data = await client.recv()
        except TimeoutError:
            events = core.timeout()
        else:
            if not data:
                return
            events = core.receive(data)
        queue = deque(events)
        while queue:
            event = queue.popleft()
            if isinstance(event, Send):
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
                        proto, event.username, event.password, make_upstream)
                except Refusal as refusal:
                    queue.extend(core.login_rejected(reply_for(refusal)))
                    continue
                assert isinstance(upstream, UpstreamSession)
                assert upstream.conn is not None and upstream.logged_in is not None
                reply, trailing = core.login_accepted(upstream.logged_in.capabilities)
                client.write(reply)
                await splice(client, upstream.conn, upstream.logged_in.trailing, trailing)
                return
