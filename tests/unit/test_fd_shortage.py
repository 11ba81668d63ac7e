"""Out of file descriptors (issue 12, item 1), the pieces: the listener's queue answered "try
again later" and asyncio's accept loop ended, its stale retries dropped, a TLS context never
cached without its CA file, the refusals a login gets, and no vault read after the daemon's
own write. The whole daemon at a real limit: tests/integration/test_fd_exhaustion.py."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Account
from proxy.daemon.limits import BUSY, QuietResourceErrors
from proxy.login import Refusal, upstream_tls
from proxy.vault import Vault

KEY = "user@example.test"
EMFILE = OSError(errno.EMFILE, "Too many open files")
ROOT = Path(__file__).resolve().parents[2]


async def test_queued_connections_are_answered_busy_and_the_accept_loop_ends(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    quiet = QuietResourceErrors(loop)
    quiet.install()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, start_serving=False)
    try:
        quiet.listen(server, BUSY["pop3"])
        listener = server.sockets[0]
        listener.setblocking(False)
        server._sockets[0].listen(16)  # type: ignore[attr-defined]  # queued, not accepted
        clients = [socket.create_connection(listener.getsockname()) for _ in range(5)]
        with caplog.at_level(logging.INFO):
            # What asyncio reports when accept() fails for lack of descriptors.
            quiet(loop, {"message": "socket.accept() out of system resource",
                         "exception": EMFILE, "socket": listener})
        for client in clients:
            client.settimeout(5)
            assert client.recv(200) == BUSY["pop3"]
            assert client.recv(200) == b""  # and closed
            client.close()
        assert quiet.shed == 0  # counted into the log line, which says how many
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "out of system resources" in lines[0], lines
        assert "try again later" in lines[0] and "5 connections answered" in lines[0]
        assert quiet._spare == -1  # free until asyncio's loop has made its next accept()
        with pytest.raises(BlockingIOError):  # which finds the queue empty: its loop ends
            server._sockets[0].accept()  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        assert quiet._spare >= 0  # and held again
    finally:
        server.close()
        quiet.uninstall()
    assert quiet._spare == -1


async def test_a_retry_that_finds_its_listener_closed_is_dropped_quietly(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: seen.append(context))
    quiet = QuietResourceErrors(loop)
    quiet.install()
    try:
        def _start_serving() -> None:  # named as asyncio's retry
            pass

        handle = loop.call_later(3600, _start_serving)
        stale = {"message": "Exception in callback", "handle": handle,
                 "exception": ValueError("Invalid file descriptor: -1")}
        other = {"message": "Exception in callback", "handle": handle,
                 "exception": ValueError("something else")}
        quiet(loop, stale)
        quiet(loop, other)
        assert seen == [other]  # anything else goes on to the handler before
        handle.cancel()
    finally:
        quiet.uninstall()
        loop.set_exception_handler(None)


def test_a_tls_context_is_not_cached_without_the_system_cas_when_out_of_descriptors() -> None:
    # In a child: its open-file limit is lowered and filled up.
    code = """
import os, resource, ssl
from proxy.net import client_tls_context
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
assert ssl.create_default_context().cert_store_stats()["x509_ca"] == 0  # says nothing
try:
    client_tls_context(None)
except OSError as exc:
    print("refused", exc.errno)
for fd in held:
    os.close(fd)
print("cas", client_tls_context(None).cert_store_stats()["x509_ca"])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == f"refused {errno.EMFILE}"
    assert int(done.stdout.split("\n")[1].split()[1]) > 0


def test_tls_context_failures_are_refusals(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    from proxy import login

    account = Account(address=KEY, provider="custom", client_id="c", scopes=[],
                      token_url="https://token.example/t", imap_server="127.0.0.1:993")

    def short(ca_file: Path | None) -> None:
        raise EMFILE

    monkeypatch.setattr(login, "client_tls_context", short)
    with pytest.raises(Refusal) as caught:
        upstream_tls(account)
    assert caught.value.kind == "unavailable"
    assert caught.value.text == ("mailproxy is short of local resources (too many open files); "
                                 "try again later")
    monkeypatch.undo()
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(Refusal) as caught:
        upstream_tls(account.model_copy(update={"ca_file": bad}))
    assert caught.value.kind == "misconfigured" and "ca_file" in caught.value.text


async def test_token_client_out_of_descriptors_is_a_temporary_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import random
    import time

    from proxy.config import TokenSettings
    from proxy.tokens import endpoint as module
    from proxy.tokens.errors import TokenUnavailable

    def short(ca_file: Path | None) -> None:
        raise EMFILE

    monkeypatch.setattr(module, "client_tls_context", short)
    account = Account(address=KEY, provider="custom", client_id="c", scopes=[],
                      token_url="https://token.example/t", imap_server="127.0.0.1:993")
    endpoint = module.TokenEndpoint(account, TokenSettings(retries=0), clock=time.time,
                                    sleep=asyncio.sleep, rng=random.Random(), transport=None)
    with pytest.raises(TokenUnavailable, match="too many open files"):
        await endpoint.request("rt", lambda s: s)


async def test_no_vault_read_after_the_daemons_own_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.tokens.store import TokenState
    from proxy.vault import files

    Vault(tmp_path).create(KEY, password="right", state=TokenState(refresh_token="rt1"))
    vault = Vault(tmp_path)
    reads: list[Path] = []
    real = files.read_file

    def counting(path: Path) -> Any:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(files, "read_file", counting)
    assert await vault.unlock(KEY, "right")  # the first login reads it, once
    assert len(reads) == 1
    assert await vault.unlock(KEY, "right")
    # A refreshed token written by this process (a new file, a new stamp).
    vault.update(KEY, lambda state: TokenState(refresh_token="rt2"))
    reads.clear()
    assert await vault.unlock(KEY, "right")
    assert vault.verified(KEY, "right")
    assert reads == []  # a stat each: out of descriptors, a login still gets through
