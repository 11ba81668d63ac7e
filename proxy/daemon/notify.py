"""Notification hooks: tell a person that an account needs them (a command, a webhook, or both).

The caller decides when an event is worth sending (thresholds, "once per event" via
``event_key``); ``Notifier.send`` delivers it and reports what happened, and never raises.

What leaves the daemon: the account address, the event name, the reason (sanitised, bounded), the
times and the host name. Never a token or a secret. The webhook URL and the command line are
treated as secrets themselves (webhook URLs often embed a token, e.g. Slack's), so logs and
results name neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import re
import shlex
import signal
import socket
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from .. import __version__
from ..config import NotifySettings
from ..net import client_tls_context

log = logging.getLogger("mailproxy.notify")

EventName = Literal[
    "authorization_required", "refresh_failing", "deadline_approaching", "recovered",
    "message_failed",  # the outbound queue gave up on a message (refused for good, expired)
]

# Upper bound on the reason passed on (env, JSON, log): provider messages are short; anything
# longer is noise or a bug, and environment variables have size limits.
REASON_MAX = 1000
# How much of a failed command's stderr goes into the log (the tail: errors come last).
STDERR_MAX = 2048
# After the command exits, how long to wait for its stderr to reach EOF: a background grandchild
# may hold the pipe open forever and must not hold up the notification.
STDERR_GRACE = 0.5
# Pause before the single webhook retry (network error, 5xx, 429).
WEBHOOK_RETRY_PAUSE = 1.0

# Variables of the daemon's environment a command does not inherit: MAILPROXY_ACCOUNTS* can carry
# client secrets (pydantic-settings reads whole account lists from it), the webhook URL may embed
# a token, and our own event variables must come from the event only.
_ENV_PREFIXES_DROPPED = ("MAILPROXY_ACCOUNTS",)
_ENV_DROPPED = frozenset({
    "MAILPROXY_NOTIFY__WEBHOOK",
    "MAILPROXY_ACCOUNT", "MAILPROXY_EVENT", "MAILPROXY_REASON", "MAILPROXY_TIME",
    "MAILPROXY_DEADLINE",
})

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
# Defence in depth: reasons come from provider error texts, which carry no secrets, but a bug
# upstream of us must not turn a notification into a leak.
_SECRET_PATTERNS = (
    re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(?i)\b(access_token|refresh_token|id_token|client_secret|client_assertion"
               r"|password|passwd|assertion)(\"?'?\s*[:=]\s*\"?'?)[^\s\"'&,;]+"),
)
# Parts of provider reasons that differ on every request (Microsoft's AADSTS messages end in
# "Trace ID: ... Correlation ID: ... Timestamp: ..."); event_key ignores them.
_VOLATILE = (
    re.compile(r"(?i)\b(trace|correlation|request)[ _-]?id\s*[:=]\s*\S+"),
    re.compile(r"(?i)\btimestamp\s*[:=]\s*\d{4}-\d\d-\d\d[T ][\d:.]+Z?"),
    re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:?\d\d)?"),
    re.compile(r"(?i)\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"),
)

# What a channel reports: ok, the result text, and extra detail for the log only (stderr).
_Outcome = tuple[bool, str, str]


@dataclass(frozen=True)
class Event:
    account: str  # the address
    event: EventName
    reason: str  # the provider's reason or the error text
    at: float  # epoch seconds
    deadline: float | None = None  # deadline_approaching: when the refresh token dies


def clean_reason(reason: str) -> str:
    """The reason as it may leave the daemon: one line, bounded, obvious secrets masked."""
    text = " ".join(_CONTROL.sub(" ", reason).split())
    text = _SECRET_PATTERNS[0].sub(r"\1 [redacted]", text)
    text = _SECRET_PATTERNS[1].sub(r"\1\2[redacted]", text)
    if len(text) > REASON_MAX:
        text = text[: REASON_MAX - 1] + "…"
    return text


def event_key(event: Event) -> str:
    """A stable key for "this event was already sent": the same for the same account, event,
    reason and deadline, whatever ``at`` is and whatever request ids or timestamps the provider
    put in the reason. Safe to store: it holds the event name and a digest, nothing else."""
    reason = clean_reason(event.reason)
    for pattern in _VOLATILE:
        reason = pattern.sub("", reason)
    reason = " ".join(reason.split()).rstrip(" .")
    deadline = "" if event.deadline is None else f"{event.deadline:.0f}"
    digest = hashlib.sha256(
        "\0".join((event.account.casefold(), event.event, reason, deadline)).encode()
    ).hexdigest()
    return f"{event.event}:{digest[:16]}"


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_line(data: bytes) -> str:
    return _CONTROL.sub(" ", data.decode("utf-8", "replace")).strip()


def _shown_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/…"


class _HideUrl(logging.Filter):
    """httpx logs every request with its full URL at INFO ("HTTP Request: POST ..."), and a
    webhook URL often embeds a token: this rewrites our URL to scheme and host on the way."""

    def __init__(self, url: str) -> None:
        super().__init__()
        # httpx may print the URL normalised (a "/" added to an empty path, say).
        self._forms = {url, str(httpx.URL(url))}
        self._shown = _shown_url(url)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(form in message for form in self._forms):
            for form in sorted(self._forms, key=len, reverse=True):
                message = message.replace(form, self._shown)
            record.msg, record.args = message, None
        return True


class _StderrTail(asyncio.Protocol):
    """Reads a pipe to its end, keeping only the last ``STDERR_MAX`` bytes (a chatty command
    must neither fill our memory nor block on a full pipe)."""

    def __init__(self) -> None:
        self.tail = b""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.tail = (self.tail + data)[-STDERR_MAX:]

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Notifier:
    """Delivers events to the configured command and webhook, concurrently.

    The command is split with ``shlex.split`` and run without a shell (write
    ``sh -c '...'`` to get one), with stdin and stdout on /dev/null, in its own process group
    so a timeout kills everything it started. Its environment is the daemon's (minus
    variables that may hold secrets, see ``_ENV_DROPPED`` and ``drop_env``) plus
    MAILPROXY_ACCOUNT, MAILPROXY_EVENT, MAILPROXY_REASON, MAILPROXY_TIME (ISO 8601 UTC) and,
    when known, MAILPROXY_DEADLINE.

    The webhook gets a JSON POST. Redirects are never followed: the URL is configured once, a
    redirect means it is wrong, and httpx would turn a 301/302 into a bodiless GET. One retry
    after a short pause on a network error, 5xx or 429. ``timeout`` applies to the command as
    a whole and to each webhook attempt.
    """

    def __init__(
        self,
        settings: NotifySettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        drop_env: Iterable[str] = (),
        retry_pause: float = WEBHOOK_RETRY_PAUSE,
    ) -> None:
        """``drop_env``: more variable names the command must not inherit (the vault's
        ``env:VARIABLE`` master key source, say)."""
        self._settings = settings
        self._drop_env = frozenset(drop_env)
        self._retry_pause = retry_pause
        self._host = socket.gethostname()
        self._argv = _split_command(settings.command) if settings.command else []
        self._client: httpx.AsyncClient | None = None
        self._hide_url: _HideUrl | None = None
        if settings.webhook is not None:
            self._hide_url = _HideUrl(settings.webhook)
            logging.getLogger("httpx").addFilter(self._hide_url)
            self._client = httpx.AsyncClient(
                transport=transport,
                timeout=settings.timeout,
                follow_redirects=False,
                headers={"User-Agent": f"mailproxy/{__version__}"},
                verify=client_tls_context(settings.ca_file),
            )

    @property
    def enabled(self) -> bool:
        return bool(self._settings.command) or self._settings.webhook is not None

    async def send(self, event: Event) -> list[str]:
        """Deliver ``event`` on every configured channel; one result line per channel.

        Failures are logged at WARNING and reported in the result, never raised (only
        cancellation propagates, after a running command has been killed)."""
        if not self.enabled:
            return []
        reason = clean_reason(event.reason)
        jobs = []
        async with asyncio.TaskGroup() as tg:
            if self._settings.command:
                jobs.append(tg.create_task(self._guard(
                    "command", self._run_command(event, reason), event, reason)))
            if self._settings.webhook is not None:
                jobs.append(tg.create_task(self._guard("webhook", self._post_webhook(
                    self._settings.webhook, event, reason), event, reason)))
        results = [job.result() for job in jobs]
        log.info("notification %s for %s (%s): %s", event.event, event.account, reason,
                 "; ".join(results))
        return results

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._hide_url is not None:
            logging.getLogger("httpx").removeFilter(self._hide_url)

    async def _guard(
        self, channel: str, job: Coroutine[Any, Any, _Outcome], event: Event, reason: str
    ) -> str:
        try:
            ok, outcome, detail = await job
        except Exception as exc:  # a bug here must not take the caller down
            log.exception("notification %s for %s: %s channel crashed", event.event,
                          event.account, channel)
            ok, outcome, detail = False, f"internal error ({type(exc).__name__})", ""
        if ok:
            return f"{channel}: {outcome}"
        log.warning("notification %s for %s (%s): %s failed: %s%s", event.event, event.account,
                    reason, channel, outcome, detail)
        return f"{channel}: failed: {outcome}"

    def _environment(self, event: Event, reason: str) -> dict[str, str]:
        env = {
            name: value for name, value in os.environ.items()
            if name not in _ENV_DROPPED and name not in self._drop_env
            and not name.startswith(_ENV_PREFIXES_DROPPED)
        }
        env["MAILPROXY_ACCOUNT"] = event.account
        env["MAILPROXY_EVENT"] = event.event
        env["MAILPROXY_REASON"] = reason
        env["MAILPROXY_TIME"] = iso_utc(event.at)
        if event.deadline is not None:
            env["MAILPROXY_DEADLINE"] = iso_utc(event.deadline)
        return env

    async def _run_command(self, event: Event, reason: str) -> _Outcome:
        if isinstance(self._argv, str):
            return False, self._argv, ""
        argv = self._argv
        name = os.path.basename(argv[0])
        timeout = self._settings.timeout
        loop = asyncio.get_running_loop()
        # Our own pipe rather than asyncio's: Process.wait() also waits for asyncio's pipes to
        # close, so a grandchild holding stderr would hang it past the kill.
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=write_fd,
                env=self._environment(event, reason),
                start_new_session=True,  # its own process group: the timeout kills it all
            )
        except OSError as exc:
            os.close(read_fd)
            why = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
            return False, f"cannot run {name!r}: {why}", ""
        finally:
            os.close(write_fd)
        tail = _StderrTail()
        pipe: asyncio.BaseTransport | None = None
        try:
            pipe, _ = await loop.connect_read_pipe(lambda: tail, os.fdopen(read_fd, "rb", 0))
            try:
                async with asyncio.timeout(timeout):
                    code = await proc.wait()
                timed_out = False
            except TimeoutError:
                _kill_group(proc.pid)
                code = await proc.wait()
                timed_out = True
            await asyncio.wait([tail.done], timeout=STDERR_GRACE)
        except BaseException:  # cancelled (or a bug): leave nothing running behind us
            _kill_group(proc.pid)
            raise
        finally:
            if pipe is not None:
                pipe.close()
        stderr = _one_line(tail.tail)
        detail = f"; stderr: {stderr}" if stderr else ""
        if timed_out:
            return False, f"timed out after {timeout:g}s (killed)", detail
        if code == 0:
            return True, "exit 0", ""
        if code < 0:
            try:
                signame = signal.Signals(-code).name
            except ValueError:
                signame = str(-code)
            return False, f"killed by {signame}", detail
        return False, f"exit {code}", detail

    async def _post_webhook(self, url: str, event: Event, reason: str) -> _Outcome:
        assert self._client is not None
        body = {
            "account": event.account,
            "event": event.event,
            "reason": reason,
            "time": iso_utc(event.at),
            "deadline": None if event.deadline is None else iso_utc(event.deadline),
            "host": self._host,
            "source": "mailproxy",
        }
        outcome = ""
        for attempt in (1, 2):
            if attempt == 2:
                await asyncio.sleep(self._retry_pause)
            retry_note = " (after a retry)" if attempt == 2 else ""
            try:
                # stream(): only the status matters; a huge or endless body is never read.
                async with self._client.stream("POST", url, json=body) as response:
                    status = response.status_code
            except httpx.HTTPError as exc:
                text = str(exc).replace(url, _shown_url(url))
                outcome = f"{type(exc).__name__}" + (f": {text}" if text else "")
                if isinstance(exc, httpx.TransportError):
                    continue
                return False, outcome, ""
            if 200 <= status < 300:
                return True, f"HTTP {status}{retry_note}", ""
            if 300 <= status < 400:
                return False, f"HTTP {status} (redirects are not followed)", ""
            outcome = f"HTTP {status}"
            if status < 500 and status != 429:
                return False, outcome, ""
        return False, f"{outcome} (after a retry)", f"; webhook {_shown_url(url)}"


def _split_command(command: str) -> list[str] | str:
    """The argv to exec, or why there is none (reported on each send, never raised: a broken
    hook must not stop the daemon)."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        return f"cannot parse the command line: {exc}"
    if not argv:
        return "the command line is empty"
    argv[0] = os.path.expanduser(argv[0])
    return argv


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
