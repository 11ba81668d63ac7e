"""The asyncio side of an upstream login, for any protocol: connect, run the sans-IO login
core until it reaches a verdict, and keep the connection for the splice (``login.Upstream``)."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import ClassVar, Literal

from ..config import Account
from ..core.events import (
    Event,
    LoggedIn,
    ReadyToAuthenticate,
    Rejected,
    Send,
    StartTls,
    UpstreamFailed,
)
from ..core.upstream import UpstreamLogin
from ..login import (
    Refusal,
    UpstreamError,
    UpstreamRejection,
    local_shortage,
    setting_fix,
    upstream_tls,
)
from ..net import Conn, describe_error, open_connection, out_of_resources, start_tls
from ..providers import Server

UPSTREAM_TIMEOUT = 30.0


class NoServer(Refusal):
    """The account names no server for this protocol (a ``custom`` account without one)."""

    def __init__(self, account: Account, proto: str) -> None:
        super().__init__("rejected", f"account {account.address} has no {proto}_server "
                         f"configured; add one to use it over {proto.upper()}")


def server_for(account: Account, proto: Literal["imap", "pop3", "smtp"]) -> Server:
    server = account.server(proto)
    if server is None:
        raise NoServer(account, proto)
    return server


class UpstreamSession:
    """Upstream login for one account (the ``login.Upstream`` interface); a subclass names
    its protocol and the sans-IO login core that speaks it."""

    proto: ClassVar[Literal["imap", "pop3"]]
    core_type: ClassVar[type[UpstreamLogin]]

    def __init__(self, account: Account, timeout: float = UPSTREAM_TIMEOUT) -> None:
        server = server_for(account, self.proto)
        self.account = account
        self.server = server
        self.description = str(server)
        self.timeout = timeout
        self.tls = upstream_tls(account)
        self.core = self.core_type(account.sasl_user, starttls=server.tls == "starttls",
                                   mechanism=account.sasl_mechanism, host=server.host,
                                   port=server.port)
        self.conn: Conn | None = None
        self.logged_in: LoggedIn | None = None

    @property
    def mechanism(self) -> str:
        return self.core.mechanism

    async def connect(self) -> None:
        try:
            self.conn = await open_connection(
                self.server.host, self.server.port,
                self.tls if self.server.tls == "implicit" else None, self.timeout)
        except (OSError, TimeoutError) as exc:
            if out_of_resources(exc):
                raise local_shortage(exc) from None  # here, not at the server
            raise UpstreamError(describe_error(exc)) from None
        event = await self._run([])
        if not isinstance(event, ReadyToAuthenticate):
            raise UpstreamError(self._reason(event), self._fix(event))

    async def authenticate(self, token: str) -> UpstreamRejection | None:
        event = await self._run(self.core.authenticate(token))
        if isinstance(event, LoggedIn):
            self.logged_in = event
            return None
        if isinstance(event, Rejected):
            return UpstreamRejection(event.text, event.temporary)
        fix = self._fix(event)
        if fix is not None:
            raise Refusal("misconfigured", f"{self.description}: {self._reason(event)}; {fix}")
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

    def _fix(self, event: Event) -> str | None:
        if isinstance(event, UpstreamFailed) and event.lacks:
            return setting_fix(self.account, self.proto, event.lacks)
        return None

    @staticmethod
    def _reason(event: Event) -> str:
        return event.reason if isinstance(event, UpstreamFailed) else f"unexpected {event!r}"
