"""Running out of file descriptors for real (issue 12, item 1): ``mailproxy run`` with an
open-file limit of 200 (soft = hard, so the daemon cannot raise it) and connection limits far
above it, filled with idle IMAP, POP3 and SMTP connections until accept() fails.

The daemon must stay up, say so once in its log (no traceback, no flood), answer logins that
hit the limit (a vault read, an upstream connect) with a temporary protocol reply, and serve
a normal login with a fetch again once the idle connections are gone, without a restart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import resource
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.clirun import ROOT
from tests.support.dovecot import Dovecot
from tests.support.imapclient import RawImap, tagged_status
from tests.support.proxyrun import LOCAL_PASSWORD, ProxyHarness
from tests.support.servers import free_port
from tests.support.tokenserver import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TokenServer

FILE_LIMIT = 200
PROTOCOLS = ("imap", "pop3", "smtp")
GREETING = {"imap": b"* OK", "pop3": b"+OK", "smtp": b"220"}


def _limit_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_LIMIT, FILE_LIMIT))


@dataclass
class Daemon:
    proc: asyncio.subprocess.Process
    ports: dict[str, int]
    log: Path


def _config(directory: Path, token_server: TokenServer, dovecot: Dovecot,
            addresses: list[str]) -> tuple[Path, dict[str, int]]:
    ports = {proto: free_port() for proto in PROTOCOLS}
    lines = [f'state_dir = "{directory / "state"}"', 'log_level = "info"',
             "[admin]", 'listen = ""']
    for proto in PROTOCOLS:
        lines += [f"[{proto}]", f'listen = "127.0.0.1:{ports[proto]}"', 'tls_listen = ""',
                  "max_connections = 10000", "max_connections_per_ip = 10000"]
        if proto == "imap":  # the warm account's login at the limit reaches the connect
            lines.append("spare_sessions = 0")
    for address in addresses:
        # SMTP: a port nobody listens on; the logins here never get as far as connecting.
        lines += ["[[accounts]]", f'address = "{address}"', 'provider = "custom"',
                  f'client_id = "{TEST_CLIENT_ID}"', f'client_secret = "{TEST_CLIENT_SECRET}"',
                  f'token_url = "{token_server.token_url}"', 'scopes = ["mail"]',
                  f'imap_server = "{dovecot.host}:{dovecot.imaps_port}"', 'imap_tls = "implicit"',
                  f'pop3_server = "{dovecot.host}:{dovecot.pop3s_port}"', 'pop3_tls = "implicit"',
                  f'smtp_server = "127.0.0.1:{free_port()}"', 'smtp_tls = "implicit"',
                  f'ca_file = "{dovecot.ca_file}"']
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path, ports


@contextlib.asynccontextmanager
async def limited_daemon(config: Path, ports: dict[str, int], log: Path
                         ) -> AsyncIterator[Daemon]:
    """``mailproxy run`` with at most FILE_LIMIT open files, its log in ``log``; stopped with
    SIGTERM at the end (it must exit 0)."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "--config", str(config), cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, preexec_fn=_limit_files)
    try:
        for proto, port in ports.items():
            for _ in range(300):
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    assert proc.returncode is None, log.read_text()
                    await asyncio.sleep(0.1)
                else:
                    writer.close()
                    break
            else:
                raise AssertionError(f"{proto} not listening: {log.read_text()}")
        yield Daemon(proc, ports, log)
        assert proc.returncode is None, f"the daemon died: {log.read_text()}"
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
        assert proc.returncode == 0, log.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
BUSY = {"imap": b"* BYE [UNAVAILABLE] ", "pop3": b"-ERR [SYS/TEMP] ", "smtp": b"421 4.7.0 "}
TEMPORARY = {"imap": b"a NO [UNAVAILABLE] ", "pop3": b"-ERR [SYS/TEMP] ", "smtp": b"454 4.7.0 "}


async def connect(daemon: Daemon, proto: str) -> tuple[Stream, bytes]:
    """A connection and its first line: the greeting, or the refusal of one too many."""
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.ports[proto])
    # A listener that ran out pauses for a second (asyncio's pause after a failed accept()).
    return (reader, writer), await asyncio.wait_for(reader.readline(), 5)


async def ask(stream: Stream, data: bytes, until: bytes = b"") -> bytes:
    """Send ``data``; the reply lines up to the first that starts with ``until``."""
    reader, writer = stream
    writer.write(data)
    out = b""
    async with asyncio.timeout(10):
        while True:
            line = await reader.readline()
            out += line
            if not line or line.startswith(until):
                return out


def _plain(user: str) -> str:
    return base64.b64encode(f"\0{user}\0{LOCAL_PASSWORD}".encode()).decode()


async def log_in(stream: Stream, proto: str, user: str) -> bytes:
    """Log in with the local password; the final reply line."""
    quoted = LOCAL_PASSWORD.replace("\\", "\\\\").replace('"', '\\"')
    if proto == "imap":
        reply = await ask(stream, f'a LOGIN "{user}" "{quoted}"\r\n'.encode(), b"a ")
    elif proto == "pop3":
        reply = await ask(stream, f"AUTH PLAIN {_plain(user)}\r\n".encode())
    else:
        await ask(stream, b"EHLO test\r\n", b"250 ")
        reply = await ask(stream, f"AUTH PLAIN {_plain(user)}\r\n".encode())
    return reply.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]


async def test_out_of_file_descriptors_degrades_quietly_and_recovers(
        tmp_path: Path, token_server: TokenServer, dovecot: Dovecot, mail_user: str) -> None:
    harness = ProxyHarness(tmp_path / "state", token_server, dovecot)
    # warm: logs in once before the limit is hit (vault open, token and TLS context cached),
    # so its logins at the limit fail at the upstream connect; cold: at the vault read.
    warm, cold = mail_user, "cold-" + mail_user
    harness.provision(warm)
    harness.provision(cold)
    dovecot.deliver(warm, b"From: a@example.test\r\nSubject: fd\r\n\r\nstill serving\r\n")
    config, ports = _config(tmp_path, token_server, dovecot, [warm, cold])
    streams: list[Stream] = []
    async with limited_daemon(config, ports, tmp_path / "proxy.log") as daemon:
        client = await RawImap.connect("127.0.0.1", ports["imap"])
        assert tagged_status(await client.login(warm, LOCAL_PASSWORD)).startswith(b"t1 OK")
        await client.close()
        try:
            # One connection per protocol and account, greeted before the limit is reached.
            waiting = {}
            for proto in PROTOCOLS:
                for user in (warm, cold):
                    stream, line = await connect(daemon, proto)
                    streams.append(stream)
                    assert line.startswith(GREETING[proto]), line
                    waiting[proto, user] = stream
            # Idle connections, round robin, until one is refused: accept() failed.
            for n in range(FILE_LIMIT):
                stream, line = await connect(daemon, PROTOCOLS[n % 3])
                streams.append(stream)
                if not line.startswith(GREETING[PROTOCOLS[n % 3]]):
                    break
            else:
                pytest.fail(f"{FILE_LIMIT} connections and accept() never failed")
            # Every listener answers "try again later" and closes, at once or within a second.
            for proto in PROTOCOLS:
                stream, line = await connect(daemon, proto)
                assert line.startswith(BUSY[proto]), (proto, line)
                assert await asyncio.wait_for(stream[0].read(), 5) == b""
            # Logins that need a file: "try again later", and the connection stays.
            for (proto, user), stream in waiting.items():
                reply = await log_in(stream, proto, user)
                assert reply.startswith(TEMPORARY[proto]), (proto, user, reply)
        finally:
            for stream in streams:
                stream[1].close()
        # Without a restart, once the daemon has seen them go: a normal login and a fetch.
        for _ in range(50):
            client = await RawImap.connect("127.0.0.1", ports["imap"])
            if client.greeting.startswith(b"* OK"):
                break
            assert client.greeting.startswith(BUSY["imap"]), client.greeting
            await client.close()
            await asyncio.sleep(0.2)
        assert tagged_status(await client.login(warm, LOCAL_PASSWORD)).startswith(b"t1 OK")
        assert tagged_status(await client.command("SELECT INBOX")).startswith(b"t2 OK")
        fetched = await client.command("FETCH 1 BODY[]")
        assert b"still serving" in fetched and tagged_status(fetched).startswith(b"t3 OK")
        await client.close()
    log = daemon.log.read_text(errors="replace")
    errors = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]
    assert len(errors) == 1 and "out of system resources" in errors[0], log[-5000:]
    # A line per session and per refused login, no more.
    assert len(log.splitlines()) < 60 + len(streams), log[-5000:]
