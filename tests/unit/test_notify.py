"""Notifier: real commands (subprocesses of this Python) and a real HTTP webhook receiver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from proxy import __version__
from proxy.config import NotifySettings
from proxy.daemon.notify import (
    REASON_MAX,
    STDERR_MAX,
    Event,
    Notifier,
    clean_reason,
    event_key,
)

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
DEADLINE = T0 + 86_400.0
REASON = "invalid_grant: Token has been expired or revoked."
EVENT = Event(account="alice@example.com", event="authorization_required", reason=REASON, at=T0)
# Planted where a careless implementation would repeat it: the command line, the webhook URL's
# path, the daemon's environment.
SECRET = "PLANTED-s3cr3t-9f2c"


def script(tmp_path: Path, name: str, body: str) -> str:
    """A command line running ``body`` with this interpreter."""
    path = tmp_path / name
    path.write_text(body)
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(path))}"


DUMP_ENV = """\
import json, os, sys
data = dict(os.environ)
data["__stdin__"] = sys.stdin.read()
with open(sys.argv[1], "w") as f:
    json.dump(data, f)
"""


def process_gone(pid: int, within: float = 3.0) -> bool:
    """Whether ``pid`` has exited (gone, or a zombie waiting for a reaper that is not us)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


async def wait_for_file(path: Path, within: float = 5.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


# --- command -----------------------------------------------------------------------------------


async def test_command_gets_exactly_the_event_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "env.json"
    monkeypatch.setenv("MAILPROXY_CONFIG", "/etc/mailproxy.toml")  # harmless: inherited
    monkeypatch.setenv("MAILPROXY_ACCOUNTS", f'[{{"client_secret": "{SECRET}"}}]')
    monkeypatch.setenv("MAILPROXY_ACCOUNTS__0__CLIENT_SECRET", SECRET)
    monkeypatch.setenv("MAILPROXY_NOTIFY__WEBHOOK", f"https://hooks.example/{SECRET}")
    monkeypatch.setenv("VAULT_KEY_VAR", SECRET)
    monkeypatch.setenv("SOME_USER_SETTING", "kept")
    command = script(tmp_path, "dump.py", DUMP_ENV) + " " + shlex.quote(str(out))
    notifier = Notifier(NotifySettings(command=command), drop_env=["VAULT_KEY_VAR"])
    event = Event("alice@example.com", "deadline_approaching", "7 days\nin testing", T0, DEADLINE)

    assert await notifier.send(event) == ["command: exit 0"]

    env = json.loads(out.read_text())
    ours = {k: v for k, v in env.items() if k.startswith("MAILPROXY_")}
    assert ours == {
        "MAILPROXY_CONFIG": "/etc/mailproxy.toml",
        "MAILPROXY_ACCOUNT": "alice@example.com",
        "MAILPROXY_EVENT": "deadline_approaching",
        "MAILPROXY_REASON": "7 days in testing",
        "MAILPROXY_TIME": "2023-11-14T22:13:20Z",
        "MAILPROXY_DEADLINE": "2023-11-15T22:13:20Z",
    }
    assert env["SOME_USER_SETTING"] == "kept"
    assert "VAULT_KEY_VAR" not in env
    assert SECRET not in out.read_text()
    assert env["__stdin__"] == ""  # /dev/null, not the daemon's stdin


async def test_no_deadline_variable_without_a_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILPROXY_DEADLINE", "stale value from the daemon's environment")
    out = tmp_path / "env.json"
    command = script(tmp_path, "dump.py", DUMP_ENV) + " " + shlex.quote(str(out))
    assert await Notifier(NotifySettings(command=command)).send(EVENT) == ["command: exit 0"]
    env = json.loads(out.read_text())
    assert "MAILPROXY_DEADLINE" not in env
    assert env["MAILPROXY_REASON"] == REASON


async def test_command_runs_without_a_shell(tmp_path: Path) -> None:
    out = tmp_path / "argv.json"
    body = "import json, sys\njson.dump(sys.argv[1:], open(sys.argv[1], 'w'))\n"
    command = script(tmp_path, "argv.py", body) + f" {shlex.quote(str(out))} '$HOME' 'a;b' \"c d\""
    assert await Notifier(NotifySettings(command=command)).send(EVENT) == ["command: exit 0"]
    assert json.loads(out.read_text()) == [str(out), "$HOME", "a;b", "c d"]


async def test_hanging_command_is_killed_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    # A fork, not a second interpreter: the grandchild and its pid file are there a moment
    # after the command starts, well within the timeout even on a busy machine.
    body = f"""\
import os, time
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
open({str(pidfile)!r}, "w").write(str(child))
time.sleep(60)
"""
    notifier = Notifier(NotifySettings(command=script(tmp_path, "hang.py", body), timeout=2.0))
    started = time.monotonic()
    results = await notifier.send(EVENT)
    elapsed = time.monotonic() - started
    assert results == ["command: failed: timed out after 2s (killed)"]
    assert elapsed < 5.0  # not the minute the command (and the grandchild holding stderr) hang
    # The whole process group went, not only the process we started.
    assert process_gone(int(pidfile.read_text()))


async def test_cancelled_send_kills_the_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "cmd.pid"
    body = f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
    notifier = Notifier(NotifySettings(command=script(tmp_path, "hang.py", body), timeout=60))
    task = asyncio.create_task(notifier.send(EVENT))
    pid = int(await wait_for_file(pidfile))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert process_gone(pid)


async def test_failing_command_reports_exit_and_logs_stderr(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = "import sys\nsys.stderr.write('first line\\nno such mailbox\\n')\nsys.exit(3)\n"
    notifier = Notifier(NotifySettings(command=script(tmp_path, "fail.py", body)))
    with caplog.at_level(logging.INFO, logger="mailproxy.notify"):
        assert await notifier.send(EVENT) == ["command: failed: exit 3"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "exit 3" in warnings[0].getMessage()
    assert "stderr: first line no such mailbox" in warnings[0].getMessage()


async def test_chatty_stderr_neither_blocks_nor_floods_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 1 MB is far more than a pipe buffer: a reader that stopped early would leave it blocked.
    body = "import sys\nsys.stderr.write('x' * 1_000_000 + 'THE END')\nsys.exit(1)\n"
    notifier = Notifier(NotifySettings(command=script(tmp_path, "chatty.py", body), timeout=5))
    with caplog.at_level(logging.WARNING, logger="mailproxy.notify"):
        assert await notifier.send(EVENT) == ["command: failed: exit 1"]
    message = caplog.records[-1].getMessage()
    assert message.endswith("THE END")
    assert len(message) < STDERR_MAX + 500


async def test_background_grandchild_holding_stderr_does_not_hold_up_send(tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    body = f"""\
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open({str(pidfile)!r}, "w").write(str(child.pid))
"""
    notifier = Notifier(NotifySettings(command=script(tmp_path, "bg.py", body), timeout=10))
    started = time.monotonic()
    try:
        assert await notifier.send(EVENT) == ["command: exit 0"]
        assert time.monotonic() - started < 3.0
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


async def test_command_killed_by_a_signal(tmp_path: Path) -> None:
    body = "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n"
    notifier = Notifier(NotifySettings(command=script(tmp_path, "sig.py", body)))
    assert await notifier.send(EVENT) == ["command: failed: killed by SIGTERM"]


async def test_missing_executable_is_a_failure_not_an_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = Notifier(NotifySettings(command=f"/nonexistent/notify-me --token {SECRET}"))
    with caplog.at_level(logging.INFO, logger="mailproxy.notify"):
        results = await notifier.send(EVENT)
    assert results == ["command: failed: cannot run 'notify-me': No such file or directory"]
    assert "No such file" in caplog.text
    assert SECRET not in caplog.text  # the command line may hold secrets: only its name is shown


async def test_unparsable_command_line() -> None:
    notifier = Notifier(NotifySettings(command="notify 'unbalanced"))
    [result] = await notifier.send(EVENT)
    assert result.startswith("command: failed: cannot parse the command line")


# --- webhook -----------------------------------------------------------------------------------


@dataclass
class Receiver:
    """A real HTTP server answering with ``statuses`` in turn (then 204), recording requests."""

    statuses: list[int] = field(default_factory=list)
    delay: float = 0.0
    hold: Callable[[], bool] | None = None  # called before answering; False: answer 409
    location: str | None = None
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serving(Receiver()) as rec:
        yield rec


@contextlib.contextmanager
def serving(rec: Receiver) -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            rec.requests.append((self.path, dict(self.headers.items()), body))
            time.sleep(rec.delay)
            status = rec.statuses.pop(0) if rec.statuses else 204
            if rec.hold is not None and not rec.hold():
                status = 409
            self.send_response(status)
            if rec.location:
                self.send_header("Location", rec.location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST  # a followed 302 would arrive as a GET

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def webhook_notifier(url: str, *, timeout: float = 5.0) -> Notifier:
    return Notifier(NotifySettings(webhook=url, timeout=timeout), retry_pause=0.05)


async def test_webhook_receives_the_documented_json(receiver: Receiver) -> None:
    notifier = webhook_notifier(receiver.url())
    event = Event("bob@example.com", "deadline_approaching", "7-day testing token", T0, DEADLINE)
    try:
        assert await notifier.send(event) == ["webhook: HTTP 204"]
    finally:
        await notifier.aclose()
    [(path, headers, body)] = receiver.requests
    assert path == "/hook"
    assert headers["User-Agent"] == f"mailproxy/{__version__}"
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {
        "account": "bob@example.com",
        "event": "deadline_approaching",
        "reason": "7-day testing token",
        "time": "2023-11-14T22:13:20Z",
        "deadline": "2023-11-15T22:13:20Z",
        "host": socket.gethostname(),
        "source": "mailproxy",
    }


async def test_webhook_deadline_is_null_when_unknown(receiver: Receiver) -> None:
    notifier = webhook_notifier(receiver.url())
    assert await notifier.send(EVENT) == ["webhook: HTTP 204"]
    await notifier.aclose()
    assert json.loads(receiver.requests[0][2])["deadline"] is None


async def test_webhook_500_then_204_is_retried_once(receiver: Receiver) -> None:
    receiver.statuses = [500]
    notifier = webhook_notifier(receiver.url())
    assert await notifier.send(EVENT) == ["webhook: HTTP 204 (after a retry)"]
    await notifier.aclose()
    assert len(receiver.requests) == 2
    assert receiver.requests[0][2] == receiver.requests[1][2]


async def test_webhook_persistent_500_fails_after_one_retry(receiver: Receiver) -> None:
    receiver.statuses = [500, 503, 500]
    notifier = webhook_notifier(receiver.url())
    assert await notifier.send(EVENT) == ["webhook: failed: HTTP 503 (after a retry)"]
    await notifier.aclose()
    assert len(receiver.requests) == 2


async def test_webhook_4xx_is_not_retried(receiver: Receiver) -> None:
    receiver.statuses = [404]
    notifier = webhook_notifier(receiver.url())
    assert await notifier.send(EVENT) == ["webhook: failed: HTTP 404"]
    await notifier.aclose()
    assert len(receiver.requests) == 1


async def test_webhook_redirect_is_not_followed(receiver: Receiver) -> None:
    with serving(Receiver()) as target:
        receiver.statuses = [302]
        receiver.location = target.url("/elsewhere")
        notifier = webhook_notifier(receiver.url())
        assert await notifier.send(EVENT) == [
            "webhook: failed: HTTP 302 (redirects are not followed)"]
        await notifier.aclose()
    assert len(receiver.requests) == 1
    assert target.requests == []


async def test_webhook_down_is_a_failure_not_an_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    notifier = webhook_notifier(f"http://127.0.0.1:{port}/hook/{SECRET}")
    with caplog.at_level(logging.INFO, logger="mailproxy.notify"):
        [result] = await notifier.send(EVENT)
    await notifier.aclose()
    assert result.startswith("webhook: failed: ConnectError")
    assert result.endswith("(after a retry)")
    assert REASON in caplog.text
    assert SECRET not in caplog.text and SECRET not in result


async def test_webhook_timeout(receiver: Receiver) -> None:
    receiver.delay = 1.0
    notifier = webhook_notifier(receiver.url(), timeout=0.3)
    started = time.monotonic()
    [result] = await notifier.send(EVENT)
    await notifier.aclose()
    assert result == "webhook: failed: ReadTimeout (after a retry)"
    assert time.monotonic() - started < 2.0


# --- both, logging, helpers --------------------------------------------------------------------


async def test_both_channels_run_concurrently(tmp_path: Path, receiver: Receiver) -> None:
    """Each channel waits for the other to have begun before it finishes: run one after the
    other, the first would wait 5 s in vain and fail (the command exits 3, the webhook gets
    409). No timing bound: a slow start of either only makes the other wait."""
    arrived, out = tmp_path / "arrived", tmp_path / "ran"

    def hold() -> bool:
        arrived.write_text("yes")
        deadline = time.monotonic() + 5
        while not out.exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    receiver.hold = hold
    body = f"""\
import os, sys, time
deadline = time.monotonic() + 5
while not os.path.exists({str(arrived)!r}):
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.02)
open({str(out)!r}, "w").write("yes")
"""
    notifier = Notifier(NotifySettings(command=script(tmp_path, "meet.py", body),
                                       webhook=receiver.url()))
    results = await notifier.send(EVENT)
    await notifier.aclose()
    assert results == ["command: exit 0", "webhook: HTTP 204"]
    assert out.read_text() == "yes" and len(receiver.requests) == 1


async def test_logs_show_the_reason_and_no_planted_secret(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAILPROXY_ACCOUNTS__0__CLIENT_SECRET", SECRET)
    receiver.statuses = [500, 500]
    body = "import sys\nsys.exit(2)\n"
    command = script(tmp_path, "fail.py", body) + f" --api-key {SECRET}"
    notifier = Notifier(NotifySettings(command=command, webhook=receiver.url(f"/x/{SECRET}")),
                        retry_pause=0.01)
    with caplog.at_level(logging.DEBUG):
        results = await notifier.send(EVENT)
    await notifier.aclose()
    assert results == ["command: failed: exit 2", "webhook: failed: HTTP 500 (after a retry)"]
    assert REASON in caplog.text
    assert "alice@example.com" in caplog.text
    assert "HTTP Request: POST http://127.0.0.1" in caplog.text  # httpx's own line, redacted
    assert SECRET not in caplog.text
    assert all(SECRET not in r for r in results)


async def test_disabled_notifier_sends_nothing() -> None:
    notifier = Notifier(NotifySettings())
    assert not notifier.enabled
    assert await notifier.send(EVENT) == []
    await notifier.aclose()
    assert Notifier(NotifySettings(command="true")).enabled
    assert Notifier(NotifySettings(webhook="https://hooks.example/x")).enabled


def test_clean_reason() -> None:
    assert clean_reason("bad\r\nthing\x00 here\t") == "bad thing here"
    assert clean_reason("x" * 5000) == "x" * (REASON_MAX - 1) + "…"
    assert len(clean_reason("x" * 5000)) == REASON_MAX
    masked = clean_reason(f"header Authorization: Bearer {SECRET} and refresh_token={SECRET}&x=1")
    assert SECRET not in masked
    assert "Bearer [redacted]" in masked and "refresh_token=[redacted]&x=1" in masked
    assert clean_reason('{"access_token": "' + SECRET + '"}') == '{"access_token": "[redacted]"}'


def test_event_key_is_stable_and_specific() -> None:
    key = event_key(EVENT)
    assert event_key(Event(EVENT.account, EVENT.event, EVENT.reason, at=T0 + 999)) == key
    assert event_key(Event("ALICE@example.com", EVENT.event, EVENT.reason, T0)) == key
    assert event_key(Event(EVENT.account, "refresh_failing", EVENT.reason, T0)) != key
    assert event_key(Event(EVENT.account, EVENT.event, "other reason", T0)) != key
    assert event_key(Event("bob@example.com", EVENT.event, EVENT.reason, T0)) != key
    with_deadline = Event(EVENT.account, EVENT.event, EVENT.reason, T0, deadline=DEADLINE)
    assert event_key(with_deadline) != key
    assert event_key(with_deadline) != event_key(
        Event(EVENT.account, EVENT.event, EVENT.reason, T0, deadline=DEADLINE + 3600))
    assert key.startswith("authorization_required:")
    assert "expired" not in key  # a digest, not the text


def test_event_key_ignores_microsoft_request_ids() -> None:
    def aadsts(trace: str, corr: str, stamp: str) -> Event:
        reason = ("invalid_grant: AADSTS700082: The refresh token has expired due to inactivity. "
                  f"Trace ID: {trace} Correlation ID: {corr} Timestamp: {stamp}")
        return Event("carol@example.com", "authorization_required", reason, T0)

    first = aadsts("0d7c3a2e-1b7f-4a8e-9c3f-2b1a5f3d4e00", "5e6f7a8b-0000-4c1d-8e2f-3a4b5c6d7e8f",
                   "2024-05-01 10:11:12Z")
    second = aadsts("9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d", "11111111-2222-4333-8444-555555555555",
                    "2024-05-02 03:04:05Z")
    assert event_key(first) == event_key(second)
    other = Event("carol@example.com", "authorization_required",
                  first.reason.replace("AADSTS700082", "AADSTS50173"), T0)
    assert event_key(other) != event_key(first)
