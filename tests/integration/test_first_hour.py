"""The first hour (issue 10): the CLI as a separate process meeting ordinary mistakes; each
one ends in one sentence on stderr and a documented exit code, never a traceback."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clirun import ROOT, mailproxy
from tests.support.servers import free_port

ACCOUNT = "someone@example.test"


def plain_config(directory: Path, *, imap: str | None = None, pop3: str | None = None,
                 top: str = "", account: str = "") -> Path:
    """A config with free loopback ports and one account (never contacted unless a test
    logs in); ``top`` goes before the first table, ``account`` into the account's table."""
    path = directory / "config.toml"
    path.write_text(f"""
state_dir = "{directory / 'state'}"
{top}
[imap]
listen = "{imap or f'127.0.0.1:{free_port()}'}"
[pop3]
listen = "{pop3 or f'127.0.0.1:{free_port()}'}"
[smtp]
listen = "127.0.0.1:{free_port()}"
[[accounts]]
address = "{ACCOUNT}"
provider = "custom"
client_id = "id"
client_secret = "secret"
token_url = "https://127.0.0.1:9/token"
scopes = ["mail"]
imap_server = "127.0.0.1:9"
{account}
""")
    return path


def one_line(stderr: str) -> str:
    """The one line a failed start says, past INFO lines of what it did first (e.g. making the
    local TLS CA)."""
    assert "Traceback" not in stderr, stderr
    lines = [x for x in stderr.strip().splitlines() if " INFO " not in x]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return plain_config(tmp_path)


def test_config_before_and_after_the_command(config: Path) -> None:
    for args in (["--config", str(config), "status"], ["status", "--config", str(config)]):
        result = mailproxy(*args, env={k: v for k, v in os.environ.items()
                                       if not k.startswith("MAILPROXY_")})
        assert ACCOUNT in result.stdout, (args, result.stdout, result.stderr)
        assert "no accounts configured" not in result.stdout


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_port_in_use(tmp_path: Path, busy_port: int) -> None:
    config = plain_config(tmp_path, pop3=f"127.0.0.1:{busy_port}")
    result = mailproxy("run", "--config", str(config))
    line = one_line(result.stderr)
    assert result.returncode == 3
    assert f"pop3 listener 127.0.0.1:{busy_port}" in line and "already in use" in line


@pytest.mark.parametrize(("listen", "words"), [
    ("192.0.2.1:2000", "no network interface of this machine has the address 192.0.2.1"),
    ("no-such-host.invalid:2000", "cannot be resolved"),
])
def test_unbindable_listen_address(tmp_path: Path, listen: str, words: str) -> None:
    result = mailproxy("run", "--config", str(plain_config(tmp_path, imap=listen)))
    line = one_line(result.stderr)
    assert result.returncode == 2
    assert f"imap listener {listen}" in line and words in line, line


def test_privileged_port_without_the_right(tmp_path: Path) -> None:
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        if os.environ.get("CI"):
            pytest.fail("needs root and setpriv (CI is set)")
        pytest.skip("needs root and setpriv")
    # Root without CAP_NET_BIND_SERVICE in its bounding set: as an unprivileged user would be.
    result = subprocess.run(
        [setpriv, "--bounding-set", "-net_bind_service", sys.executable, "-m", "proxy", "run",
         "--config", str(plain_config(tmp_path, pop3="127.0.0.1:110"))],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    line = one_line(result.stderr)
    assert result.returncode == 2
    assert "pop3 listener 127.0.0.1:110" in line and "CAP_NET_BIND_SERVICE" in line, line


def test_unusable_state_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = mailproxy("run", "--config", str(plain_config(tmp_path)),
                       env={**os.environ, "MAILPROXY_STATE_DIR": str(tmp_path / "file" / "x")})
    line = one_line(result.stderr)
    assert result.returncode == 2
    assert "state directory" in line and str(tmp_path / "file" / "x") in line, line


async def test_second_daemon_on_the_same_state_dir_binds_nothing(tmp_path: Path) -> None:
    first = plain_config(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(first), cwd=ROOT,
        stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        while b"listening" not in await asyncio.wait_for(proc.stderr.readline(), 30):
            pass
        # Other ports, same state directory.
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        second = plain_config(second_dir, top=f'state_dir = "{tmp_path / "state"}"')
        second.write_text(second.read_text().replace(
            f'state_dir = "{second_dir / "state"}"\n', "", 1))
        result = await asyncio.to_thread(mailproxy, "run", "--config", str(second))
        line = one_line(result.stderr)
        assert result.returncode == 3
        assert "another mailproxy daemon is already running" in line, line
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)


def _no_mailproxy_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MAILPROXY_")}


async def test_status_exit_codes(tmp_path: Path) -> None:
    config = plain_config(tmp_path)
    env = _no_mailproxy_env()
    result = await asyncio.to_thread(mailproxy, "status", "--config", str(config), env=env)
    assert result.returncode == 3, result  # no daemon
    assert f"NOT AUTHORIZED: not authorized yet: run `mailproxy authorize {ACCOUNT}`" \
        in result.stdout
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(config), cwd=ROOT, env=env,
        stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        while b"listening" not in await asyncio.wait_for(proc.stderr.readline(), 30):
            pass
        result = await asyncio.to_thread(mailproxy, "status", "--config", str(config), env=env)
        assert result.returncode == 1, result  # needs attention: not authorized
        assert result.stdout.startswith("daemon running")
        done = await asyncio.to_thread(mailproxy, "token", "import", ACCOUNT, "--no-verify",
                                       "--config", str(config), stdin="rt\nlocal pw\n", env=env)
        assert done.returncode == 0, done.stderr
        result = await asyncio.to_thread(mailproxy, "status", "--config", str(config), env=env)
        assert result.returncode == 0, result  # all good
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)


def test_environment_mistakes(config: Path) -> None:
    env = _no_mailproxy_env()
    result = mailproxy("status", "--config", str(config),
                       env={**env, "MAILPROXY_IMAP__LISTEN": "abc"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(config) not in result.stderr  # the file is not to blame
    assert "imap.listen: expected 'host:port', got 'abc' (set by the environment variable " \
        "MAILPROXY_IMAP__LISTEN)" in result.stderr
    result = mailproxy("status", "--config", str(config),
                       env={**env, "MAILPROXY_LOG_LEVEL": "INFO"})
    assert result.returncode == 3 and result.stderr == "", result.stderr
    result = mailproxy("status", "--config", str(config),
                       env={**env, "MAILPROXY_IMAP_LISTEN": "x"})
    line = one_line(result.stderr)
    assert "environment variable MAILPROXY_IMAP_LISTEN sets nothing (misspelt?" in line


def test_state_dir_of_another_user_is_not_written(config: Path) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("needs root (CI is set)")
        pytest.skip("needs root to give the state directory to another user")
    state = config.parent / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)  # the daemon's user, say
    result = mailproxy("password", "set", ACCOUNT, "--config", str(config), stdin="pw\n")
    line = one_line(result.stderr)
    assert result.returncode == 1
    assert f"the state directory {state} belongs to" in line and "uid 65534" in line, line
    assert list(state.iterdir()) == []


async def test_network_down_login_leaves_no_unretrieved_task(tmp_path: Path) -> None:
    """The upstream connect fails first, then the token request times out: the connect's
    exception is retrieved, not reported as "never retrieved"."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen()
    config = plain_config(tmp_path, top="[tokens]\nrequest_timeout = 1\nretries = 0\n",
                          account='flow = "client_credentials"')
    text = config.read_text().replace("https://127.0.0.1:9/token",
                                      f"http://127.0.0.1:{blackhole.getsockname()[1]}/token")
    config.write_text(text)
    done = mailproxy("password", "set", ACCOUNT, "--config", str(config), stdin="local pw\n")
    assert done.returncode == 0, done.stderr
    port = int(text.split('[imap]\nlisten = "127.0.0.1:', 1)[1].split('"', 1)[0])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(config), cwd=ROOT,
        env=_no_mailproxy_env(), stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        while b"listening" not in await asyncio.wait_for(proc.stderr.readline(), 30):
            pass
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readline()
            writer.write(f'a LOGIN {ACCOUNT} "local pw"\r\n'.encode())
            reply = await asyncio.wait_for(reader.readline(), 30)
            assert reply.startswith(b"a NO [UNAVAILABLE]"), reply
            writer.close()
        await asyncio.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        blackhole.close()
    log = err.decode()
    assert "never retrieved" not in log and "Traceback" not in log, log


async def test_app_only_account_without_vault_fetches_no_token(tmp_path: Path) -> None:
    """A client-credentials account before `password set`: said once at start-up, and no
    background token request (it could not be kept)."""
    endpoint = socket.socket()
    endpoint.bind(("127.0.0.1", 0))
    endpoint.listen()
    endpoint.setblocking(False)
    config = plain_config(tmp_path, account='flow = "client_credentials"')
    config.write_text(config.read_text().replace(
        "https://127.0.0.1:9/token", f"http://127.0.0.1:{endpoint.getsockname()[1]}/token"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(config), cwd=ROOT,
        env=_no_mailproxy_env(), stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        while b"listening" not in await asyncio.wait_for(proc.stderr.readline(), 30):
            pass
        await asyncio.sleep(3)
        with pytest.raises(BlockingIOError):
            endpoint.accept()  # nobody asked the token endpoint
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        endpoint.close()
    log = err.decode()
    assert log.count(f"account {ACCOUNT} is not authorized yet") == 1, log
    assert "could not save token state" not in log


async def test_status_when_the_daemon_answers_another_user_only(tmp_path: Path) -> None:
    """As root beside a daemon of another user: says so, shows the state on disk."""
    from proxy.daemon.control import ControlServer

    config = plain_config(tmp_path)

    async def handler(command: str) -> dict[str, object]:
        return {"accounts": []}

    server = ControlServer(tmp_path / "state" / "control.sock", handler)
    server._own_uid = os.geteuid() + 1  # a daemon running as another user
    await server.start()
    try:
        result = await asyncio.to_thread(mailproxy, "status", "--config", str(config),
                                         env=_no_mailproxy_env())
    finally:
        await server.aclose()
    assert result.returncode == 1, result  # the account on disk needs attention
    assert result.stdout.startswith(f"daemon running, but it did not answer uid {os.geteuid()}: "
                                    "permission denied; run `mailproxy status` as "), result.stdout
    assert ACCOUNT in result.stdout and "Traceback" not in result.stderr


def test_password_help_and_add_without_a_vault(config: Path) -> None:
    for action, words in (("set", "removing any others"), ("add", "keeping the others"),
                          ("remove", "can no longer log in"), ("list", "never the passwords")):
        result = mailproxy("password", action, "--help")
        assert result.returncode == 0 and words in " ".join(result.stdout.split()), result
    # Said before any password is asked for (standard input stays unread).
    result = mailproxy("password", "add", ACCOUNT, "--config", str(config), stdin="")
    line = one_line(result.stderr)
    assert result.returncode == 2
    assert f"{ACCOUNT} has no vault yet: run `mailproxy authorize {ACCOUNT}`" in line, line
