"""An IMAP client session: run the local core, log in upstream, then splice."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from .config import Account, Settings
from .core.events import (
    Close,
    Event,
    LoggedIn,
    LoginRequest,
    ReadyToAuthenticate,
    Rejected,
    Send,
    StartTls,
    UpstreamFailed,
)
from .core.imap import ImapLocal
from .core.imap_upstream import ImapUpstream
from .login import Gate, Refusal, UpstreamError, UpstreamRejection
from .net import Conn, client_tls_context, describe_error, open_connection, splice, start_tls

log = logging.getLogger("mailproxy.imap")

UPSTREAM_TIMEOUT = 30.0

_CODES = {
    "credentials": "NO [AUTHENTICATIONFAILED]",
    "authorization": "NO [AUTHENTICATIONFAILED]",
    "rejected": "NO [AUTHENTICATIONFAILED]",
    "unavailable": "NO [UNAVAILABLE]",
}


class ImapUpstreamSession:
    """Upstream login for one account (the ``login.Upstream`` interface)."""

    def __init__(self, account: Account, timeout: float = UPSTREAM_TIMEOUT) -> None:
        server = account.server("imap")
        assert server is not None  # config validation guarantees an IMAP server
        self.server = server
        self.description = str(server)
        self.timeout = timeout
        self.tls = client_tls_context(account.ca_file)
        self.core = ImapUpstream(account.sasl_user, starttls=server.tls == "starttls",
                                 mechanism=account.sasl_mechanism, host=server.host,
                                 port=server.port)
        self.conn: Conn | None = None
        self.logged_in: LoggedIn | None = None

    async def connect(self) -> None:
        try:
            self.conn = await open_connection(
                self.server.host, self.server.port,
                self.tls if self.server.tls == "implicit" else None, self.timeout)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(describe_error(exc)) from None
        event = await self._run([])
        if not isinstance(event, ReadyToAuthenticate):
            raise UpstreamError(self._reason(event))

    async def authenticate(self, token: str) -> UpstreamRejection | None:
        event = await self._run(self.core.authenticate(token))
        if isinstance(event, LoggedIn):
            self.logged_in = event
            return None
        if isinstance(event, Rejected):
            return UpstreamRejection(event.text, event.temporary)
        raise Refusal("unavailable", f"{self.description}: {self._reason(event)}")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    async def _run(self, events: list[Event]) -> Event:
        """Carry out the core's events until it reaches a verdict."""
        conn = self.conn
        assert conn is not None
        queue = deque(events)
        while True:
            while queue:
                event = queue.popleft()
                if isinstance(event, Send):
                    conn.write(event.data)
                elif isinstance(event, StartTls):
                    try:
                        await start_tls(conn, self.tls, self.server.host, self.timeout)
                    except (OSError, TimeoutError) as exc:
                        return UpstreamFailed(f"STARTTLS failed: {describe_error(exc)}")
                    queue.extend(self.core.tls_established())
                else:
                    return event
            try:
                async with asyncio.timeout(self.timeout):
                    data = await conn.recv()
            except TimeoutError:
                return UpstreamFailed("no answer from the server")
            if not data:
                return UpstreamFailed("the server closed the connection")
            queue.extend(self.core.receive(data))

    @staticmethod
    def _reason(event: Event) -> str:
        return event.reason if isinstance(event, UpstreamFailed) else f"unexpected {event!r}"


async def imap_session(gate: Gate, settings: Settings, client: Conn) -> None:
    limits = settings.imap
    core = ImapLocal(max_line=limits.max_line, max_literal=limits.max_literal)
    client.write(core.greeting())
    while True:
        try:
            async with asyncio.timeout(limits.login_timeout):
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
            elif isinstance(event, LoginRequest):
                try:
                    _, upstream = await gate.log_in(
                        "imap", event.username, event.password, ImapUpstreamSession)
                except Refusal as refusal:
                    queue.extend(core.login_rejected(f"{_CODES[refusal.kind]} {refusal.text}"))
                    continue
                assert isinstance(upstream, ImapUpstreamSession)
                assert upstream.conn is not None and upstream.logged_in is not None
                reply, trailing = core.login_accepted(upstream.logged_in.capabilities)
                client.write(reply)
                await splice(client, upstream.conn, upstream.logged_in.trailing, trailing)
                return
