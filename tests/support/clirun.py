"""The command line as a user runs it, for tests: separate processes, a config file, stdin."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.dovecot import Dovecot
from tests.support.imapclient import RawImap
from tests.support.servers import free_port
from tests.support.tokenserver import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TokenServer

ROOT = Path(__file__).resolve().parents[2]


def mailproxy(*args: str, stdin: str = "", env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], input=stdin, text=True,
                          capture_output=True, cwd=ROOT, timeout=60, env=env)


def write_config(directory: Path, token_server: TokenServer, dovecot: Dovecot, address: str,
                 *, top: str = "", account: str = "", admin: str = "") -> Path:
    """A config file with one account on the test Dovecot; ``top`` goes before the first
    table, ``account`` into the account's table, ``admin`` is ``[admin] listen`` (off by
    default, so test daemons never compete for the default port)."""
    path = directory / "config.toml"
    path.write_text(f"""
state_dir = "{directory / 'state'}"
{top}
[imap]
listen = "127.0.0.1:{free_port()}"
tls_listen = "127.0.0.1:{free_port()}"
[pop3]
listen = "127.0.0.1:{free_port()}"
tls_listen = "127.0.0.1:{free_port()}"
[smtp]
listen = "127.0.0.1:{free_port()}"
tls_listen = "127.0.0.1:{free_port()}"
[[accounts]]
address = "{address}"
provider = "custom"
client_id = "{TEST_CLIENT_ID}"
client_secret = "{TEST_CLIENT_SECRET}"
token_url = "{token_server.token_url}"
scopes = ["mail"]
imap_server = "{dovecot.host}:{dovecot.imaps_port}"
imap_tls = "implicit"
ca_file = "{dovecot.ca_file}"
{account}
[admin]
listen = "{admin}"
""")
    return path


def listen_port(config: Path) -> int:
    line = next(x for x in config.read_text().splitlines() if x.startswith("listen"))
    return int(line.rsplit(":", 1)[1].rstrip('"'))


@dataclass
class DaemonProcess:
    proc: asyncio.subprocess.Process
    imap_port: int
    stderr: str = field(default="")

    async def connect(self) -> RawImap:
        return await RawImap.connect("127.0.0.1", self.imap_port)


@contextlib.asynccontextmanager
async def running_daemon(config: Path, env: dict[str, str] | None = None
                         ) -> AsyncIterator[DaemonProcess]:
    """``mailproxy run --config`` in its own process, ready to take IMAP logins; stopped with
    SIGTERM at the end (its exit status must be 0), its log in ``.stderr``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(config), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    daemon = DaemonProcess(proc, listen_port(config))
    try:
        # 30 s: a first start makes the local CA and its keys, slow on a busy machine.
        for _ in range(300):
            try:
                client = await daemon.connect()
            except OSError:
                if proc.returncode is not None:
                    _, err = await proc.communicate()
                    raise AssertionError(f"mailproxy run exited: {err.decode()}") from None
                await asyncio.sleep(0.1)
            else:
                await client.close()
                break
        else:
            raise AssertionError("mailproxy run did not start listening")
        yield daemon
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        daemon.stderr = err.decode()
        assert proc.returncode == 0, daemon.stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
