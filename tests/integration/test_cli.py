"""The command line as a user runs it: separate processes, a config file, standard input."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from pathlib import Path

import pytest

from tests.support.clirun import ROOT, listen_port, mailproxy, running_daemon, write_config
from tests.support.dovecot import Dovecot
from tests.support.imapclient import RawImap, tagged_status
from tests.support.servers import free_port
from tests.support.tokenserver import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TokenServer


@pytest.fixture
def config(tmp_path: Path, token_server: TokenServer, dovecot: Dovecot, mail_user: str) -> Path:
    return write_config(tmp_path, token_server, dovecot, mail_user)


async def test_password_import_run_login_and_clean_stop(
        config: Path, token_server: TokenServer, mail_user: str) -> None:
    done = mailproxy("password", "set", mail_user, "--config", str(config), stdin="local pw\n")
    assert done.returncode == 0, done.stderr
    rt = token_server.authority.issue_refresh_token(mail_user, TEST_CLIENT_ID)
    # The vault exists now: the second line is the local password that opens it.
    done = mailproxy("token", "import", mail_user, "--config", str(config),
                     stdin=rt + "\nwrong pw\n")
    assert done.returncode == 1 and "does not open the vault" in done.stderr
    done = mailproxy("token", "import", mail_user, "--config", str(config),
                     stdin=rt + "\nlocal pw\n")
    assert done.returncode == 0, done.stderr
    assert "token works" in done.stdout
    state = config.parent / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = [p for p in state.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert not any(b"local pw" in p.read_bytes() for p in files)
    assert not any(rt.encode() in p.read_bytes() for p in files)

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(config), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        port = listen_port(config)
        for _ in range(300):  # a first start makes the local CA: slow on a busy machine
            try:
                client = await RawImap.connect("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("mailproxy run did not start listening")
        assert tagged_status(await client.login(mail_user, "local pw")).startswith(b"t1 OK")
        assert tagged_status(await client.command("SELECT INBOX")).startswith(b"t2 OK")
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
        await client.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    log = stderr.decode()
    assert "imap listening on 127.0.0.1" in log and "shutting down" in log
    assert "local pw" not in log and rt not in log and TEST_CLIENT_SECRET not in log


def test_import_of_a_revoked_token_fails_clearly(config: Path, token_server: TokenServer,
                                                 mail_user: str) -> None:
    rt = token_server.authority.issue_refresh_token(mail_user, TEST_CLIENT_ID)
    token_server.authority.revoke_refresh_token(rt)
    done = mailproxy("token", "import", mail_user, "--config", str(config),
                     stdin=rt + "\nnew pw\n")
    assert done.returncode == 1
    assert "refused this refresh token" in done.stderr and "invalid_grant" in done.stderr
    assert "Traceback" not in done.stderr and rt not in done.stderr
    assert "stored" not in done.stdout and "nothing was stored" in done.stderr
    # Verified before storing: no vault was made with the refused token.
    vaults = config.parent / "state" / "vault"
    assert not vaults.exists() or not any(p.suffix == ".vault" for p in vaults.iterdir())


def test_unknown_account_and_empty_input(config: Path, mail_user: str) -> None:
    done = mailproxy("password", "set", "nobody@example.test", "--config", str(config),
                     stdin="pw\n")
    assert done.returncode == 2
    assert f"no account 'nobody@example.test' in the configuration (accounts: {mail_user})" \
        in done.stderr
    done = mailproxy("password", "set", mail_user, "--config", str(config), stdin="")
    assert done.returncode == 2 and "expected a line on standard input" in done.stderr


def test_config_from_environment_variable(config: Path, mail_user: str) -> None:
    env = {**os.environ, "MAILPROXY_CONFIG": str(config)}
    done = mailproxy("password", "set", mail_user, stdin="pw\n", env=env)
    assert done.returncode == 0, done.stderr
    assert f"local password for {mail_user} set" in done.stdout


async def test_readme_first_command_runs_the_example_config(tmp_path: Path) -> None:
    """`mailproxy run --config config.example.toml`: starts with nothing authorized, says what
    each account needs, and answers a client with the command to run."""
    ports = {proto: free_port() for proto in ("IMAP", "POP3", "SMTP", "ADMIN")}
    env = {**os.environ, "MAILPROXY_STATE_DIR": str(tmp_path / "state"),
           **{f"MAILPROXY_{p}__LISTEN": f"127.0.0.1:{port}" for p, port in ports.items()},
           **{f"MAILPROXY_{p}__TLS_LISTEN": f"127.0.0.1:{free_port()}"
              for p in ("IMAP", "POP3", "SMTP")}}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(ROOT / "config.example.toml"),
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        for _ in range(300):  # a first start makes the local CA: slow on a busy machine
            try:
                client = await RawImap.connect("127.0.0.1", ports["IMAP"])
                break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("mailproxy run did not start listening")
        status = tagged_status(await client.login("someone@gmail.com", "pw")).decode()
        assert status == ("t1 NO [AUTHENTICATIONFAILED] account someone@gmail.com is not "
                          "authorized yet: run `mailproxy authorize someone@gmail.com`")
        await client.close()
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert ("account someone@gmail.com is not authorized yet: run "
            "`mailproxy authorize someone@gmail.com`") in stderr.decode()


def _environ(pid: int) -> dict[str, str]:
    """The environment the process ``pid`` was started (or last exec'd) with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux")
async def test_run_restarts_once_with_the_c_allocator(config: Path) -> None:
    """So memory freed by ended sessions goes back to the system (daemon/memory.py): the same
    process (systemd's main PID) runs again with PYTHONMALLOC=malloc; a PYTHONMALLOC the user
    set is kept."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}
    async with running_daemon(config, env=env) as daemon:
        pid = daemon.proc.pid
        started = _environ(pid)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert started.get("PYTHONMALLOC") == "malloc"
    assert cmdline[1:5] == [b"-m", b"proxy", b"run", b"--config"]
    assert daemon.stderr.count("memory allocator: the C library's") == 1
    assert daemon.stderr.count(" starting: configuration ") == 1

    async with running_daemon(config, env={**env, "PYTHONMALLOC": "pymalloc"}) as daemon:
        started = _environ(daemon.proc.pid)
    assert started.get("PYTHONMALLOC") == "pymalloc" and "_MAILPROXY_ALLOCATOR" not in started
    assert "memory allocator: Python's own (pymalloc)" in daemon.stderr
