"""Prometheus metrics (a registry owned by the daemon) and the ``/metrics``, ``/livez`` and
``/readyz`` endpoints on a port of their own, served with aiohttp from the daemon's loop."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .. import __version__
from ..config import Account, parse_hostport
from ..observe import Observer
from ..queue.index import Queued
from ..tokens.grants import REFRESH_FLOWS
from ..tokens.manager import TokenManager

log = logging.getLogger("mailproxy.metrics")

PROTOCOLS = ("imap", "pop3", "smtp")
# Local logins take milliseconds; a cold upstream login with a token refresh up to seconds.
LOGIN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _TokenCollector(Collector):
    """Per account, read at scrape time from the token manager (follows reloads by itself)."""

    def __init__(self, accounts: Callable[[], Sequence[Account]],
                 tokens: Callable[[], TokenManager]) -> None:
        self._accounts = accounts
        self._tokens = tokens

    def collect(self) -> Iterable[Metric]:
        expiry = GaugeMetricFamily("mailproxy_token_expiry_timestamp_seconds",
                                   "When the cached access token expires (Unix time).",
                                   labels=["account"])
        authorized = GaugeMetricFamily("mailproxy_account_authorized",
                                       "1 when the account holds a usable grant, 0 when a person "
                                       "must sign in again.", labels=["account"])
        source = self._tokens().source
        for account in self._accounts():
            try:
                # As last read or written: a scrape never touches the disk from the loop.
                state = source.last_state(account.key)
            except KeyError:
                continue
            if state.expires_at is not None:
                expiry.add_metric([account.address], state.expires_at)
            missing = account.flow in REFRESH_FLOWS and not state.refresh_token \
                and not state.locked
            ok = state.needs_authorization is None and not missing
            authorized.add_metric([account.address], 1.0 if ok else 0.0)
        yield expiry
        yield authorized


class _QueueCollector(Collector):
    """The outbound queue per account, from the queue service's summary in memory."""

    def __init__(self, accounts: Callable[[], Sequence[Account]],
                 summary: Callable[[], Mapping[str, Queued]],
                 clock: Callable[[], float] = time.time) -> None:
        self._accounts = accounts
        self._summary = summary
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        messages = GaugeMetricFamily("mailproxy_queue_messages",
                                     "Messages in the outbound queue.", labels=["account"])
        oldest = GaugeMetricFamily("mailproxy_queue_oldest_age_seconds",
                                   "Age of the oldest message in the outbound queue (0: empty).")
        summary = self._summary()
        shown = set()
        for account in self._accounts():
            if account.server("smtp") is not None:
                queued = summary.get(account.key)
                messages.add_metric([account.address], queued.messages if queued else 0)
                shown.add(account.key)
        for key, queued in summary.items():  # an account removed from the configuration
            if key not in shown:
                messages.add_metric([key], queued.messages)
        first = min((queued.oldest for queued in summary.values()), default=None)
        oldest.add_metric([], max(0.0, self._clock() - first) if first is not None else 0.0)
        yield messages
        yield oldest


class Metrics(Observer):
    """The daemon's metrics; an ``Observer`` the login gate, sessions and tokens report to."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.logins = Counter("mailproxy_logins", "Client logins by verdict.",
                              ["protocol", "result"], registry=registry)
        self.login_duration = Histogram("mailproxy_login_duration_seconds",
                                        "Time from a client's login command to the verdict.",
                                        ["protocol"], buckets=LOGIN_BUCKETS, registry=registry)
        self.sessions = Gauge("mailproxy_sessions", "Open client connections.", ["protocol"],
                              registry=registry)
        self.relayed = Counter("mailproxy_relayed_bytes",
                               "Bytes exchanged with clients, counted when a session ends.",
                               ["protocol", "direction"], registry=registry)
        self.upstream_auths = Counter("mailproxy_upstream_auth",
                                      "SASL logins at the upstream servers.",
                                      ["protocol", "mechanism", "result"], registry=registry)
        self.spares = Counter("mailproxy_upstream_spare",
                              "Client logins that looked for a logged-in spare upstream session.",
                              ["protocol", "result"], registry=registry)
        self.token_requests = Counter("mailproxy_token_requests",
                                      "Requests to the token endpoints.",
                                      ["account", "grant", "result"], registry=registry)
        self.smtp_messages = Counter("mailproxy_smtp_messages", "Messages by final reply.",
                                     ["result"], registry=registry)
        self.build_info = Gauge("mailproxy_build_info", "The running version.", ["version"],
                                registry=registry)
        self.build_info.labels(__version__).set(1)
        # The standard process_* series (Linux): resident memory, open descriptors and their
        # limit, CPU seconds, start time: what sessions cost and whether memory goes back.
        ProcessCollector(registry=registry)
        for proto in PROTOCOLS:
            self.sessions.labels(proto)

    def watch_tokens(self, accounts: Callable[[], Sequence[Account]],
                     tokens: Callable[[], TokenManager]) -> None:
        self.registry.register(_TokenCollector(accounts, tokens))

    def watch_queue(self, accounts: Callable[[], Sequence[Account]],
                    summary: Callable[[], Mapping[str, Queued]]) -> None:
        self.registry.register(_QueueCollector(accounts, summary))

    def count_sessions(self, proto: str, count: Callable[[], int]) -> None:
        self.sessions.labels(proto).set_function(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # -- Observer ------------------------------------------------------------------------------

    def login(self, proto: str, result: str, seconds: float) -> None:
        self.logins.labels(proto, result).inc()
        self.login_duration.labels(proto).observe(seconds)

    def upstream_auth(self, proto: str, mechanism: str, result: str) -> None:
        self.upstream_auths.labels(proto, mechanism, result).inc()

    def spare(self, proto: str, result: str) -> None:
        self.spares.labels(proto, result).inc()

    def session_ended(self, proto: str, received: int, sent: int) -> None:
        self.relayed.labels(proto, "in").inc(received)
        self.relayed.labels(proto, "out").inc(sent)

    def token_request(self, account: str, grant: str, result: str) -> None:
        self.token_requests.labels(account, grant, result).inc()

    def smtp_message(self, result: str) -> None:
        self.smtp_messages.labels(result).inc()


class MetricsServer:
    """``/metrics``, ``/livez`` (the loop answers) and ``/readyz`` (``ready()`` says why not)."""

    def __init__(self, metrics: Metrics, ready: Callable[[], str | None]) -> None:
        self._metrics = metrics
        self._ready = ready
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None
        self.listen = ""

    async def start(self, listen: str) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = parse_hostport(listen)
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        server = site._server  # the one asyncio.Server, for the port actually bound
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.address = sockets[0].getsockname()[:2]
        self._runner, self.listen = runner, listen
        log.info("metrics listening on %s:%d", *(self.address or (host, port)))

    async def aclose(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _scrape(self, request: web.Request) -> web.Response:
        body = self._metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _livez(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        problem = self._ready()
        if problem is None:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"not ready: {problem}\n")
