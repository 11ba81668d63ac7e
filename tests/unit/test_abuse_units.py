"""Issue 12's pure pieces: the guessing penalty, connection limits, quiet resource errors,
the password-check queue, and the cores naming what an upstream lacks for good."""

from __future__ import annotations

import asyncio
import errno
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.config import AuthSettings
from proxy.core.events import ReadyToAuthenticate, UpstreamFailed
from proxy.core.imap_upstream import ImapUpstream
from proxy.core.pop3_upstream import Pop3Upstream
from proxy.daemon.limits import ConnectionLimits, QuietResourceErrors
from proxy.penalty import Penalty
from proxy.vault import Vault, VaultBusy
from tests.support.clock import ManualClock as Clock

KEY = "user@example.test"


def test_delay_doubles_per_failure_up_to_the_cap_and_a_success_resets_it() -> None:
    clock = Clock()
    penalty = Penalty(AuthSettings(failure_delay=1.0, failure_delay_max=15.0), clock)
    assert penalty.delay("10.0.0.1") == 0
    delays = []
    for _ in range(7):
        penalty.failed("10.0.0.1", KEY)
        delays.append(penalty.delay("10.0.0.1"))
    assert delays == [1, 2, 4, 8, 15, 15, 15]
    assert penalty.delay("10.0.0.2") == 0  # per peer
    penalty.succeeded("10.0.0.1")
    assert penalty.delay("10.0.0.1") == 0


def test_failure_limits_per_peer_and_account_within_the_window() -> None:
    clock = Clock()
    penalty = Penalty(AuthSettings(max_failures_per_ip=3, max_failures_per_account=5,
                                   failure_window=60), clock)
    for _ in range(3):
        assert not penalty.peer_blocked("10.0.0.1")
        penalty.failed("10.0.0.1", KEY)
    assert penalty.peer_blocked("10.0.0.1")
    assert not penalty.account_blocked(KEY)
    penalty.failed("10.0.0.2", KEY)
    penalty.failed("10.0.0.3", KEY)
    assert penalty.account_blocked(KEY) and not penalty.account_blocked("other@example.test")
    clock.now += 61
    assert not penalty.peer_blocked("10.0.0.1") and not penalty.account_blocked(KEY)


async def test_a_peers_checks_take_turns_each_after_its_delay() -> None:
    penalty = Penalty(AuthSettings(failure_delay=0.2, failure_delay_max=0.2))
    penalty.failed("10.0.0.1", KEY)
    inside = 0
    most = 0

    async def check() -> None:
        nonlocal inside, most
        async with penalty.turn("10.0.0.1"):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0)
            inside -= 1

    started = time.monotonic()
    await asyncio.gather(*(check() for _ in range(4)))
    assert most == 1
    assert time.monotonic() - started >= 0.8
    started = time.monotonic()
    async with penalty.turn("10.0.0.9"):  # no failures: at once
        pass
    assert time.monotonic() - started < 0.1


def test_connection_limits_total_and_per_address() -> None:
    limits = ConnectionLimits(total=3, per_ip=2)
    assert limits.admit("a") and limits.admit("a")
    assert not limits.admit("a")
    assert limits.admit("b")
    assert not limits.admit("c")  # total reached
    limits.release("a")
    assert limits.admit("c")
    unlimited = ConnectionLimits(total=0, per_ip=0)
    assert all(unlimited.admit("a") for _ in range(5000))


def test_out_of_descriptors_is_logged_once_without_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    try:
        quiet = QuietResourceErrors(loop)
        error = OSError(errno.EMFILE, "Too many open files")
        with caplog.at_level(logging.DEBUG):
            for _ in range(1000):
                quiet(loop, {"message": "socket.accept() out of system resource",
                             "exception": error})
        lines = [r for r in caplog.records if "out of system resources" in r.getMessage()]
        assert len(lines) == 1 and lines[0].exc_info is None
        assert quiet.suppressed == 999
    finally:
        loop.close()


def _vault(tmp_path: Path) -> Vault:
    Vault(tmp_path).create(KEY, password="right")
    return Vault(tmp_path)


async def test_known_good_password_passes_while_guesses_fill_the_queue(tmp_path: Path) -> None:
    vault = _vault(tmp_path)
    assert await vault.unlock(KEY, "right")
    guesses = [asyncio.create_task(vault.unlock(KEY, f"guess {n}")) for n in range(4)]
    await asyncio.sleep(0)
    with pytest.raises(VaultBusy):  # a fifth different password is refused, not queued
        await vault.unlock(KEY, "guess 5")
    started = time.monotonic()
    assert await vault.unlock(KEY, "right")  # no waiting behind the guesses
    assert not any(g.done() for g in guesses)  # through before the first guess is checked
    assert time.monotonic() - started < 0.25
    assert vault.verified(KEY, "right") and not vault.verified(KEY, "guess 1")
    assert not any(await asyncio.gather(*guesses))


async def test_dummy_check_costs_about_a_real_one(tmp_path: Path) -> None:
    vault = _vault(tmp_path)
    real, dummy = [], []
    for n in range(5):
        started = time.monotonic()
        assert not await vault.unlock(KEY, f"wrong {n}")
        real.append(time.monotonic() - started)
        started = time.monotonic()
        await vault.dummy_check(f"wrong {n}")
        dummy.append(time.monotonic() - started)
    # The same scrypt: comparable, within a busy machine's noise.
    assert 0.3 < statistics.median(dummy) / statistics.median(real) < 3, (real, dummy)


def test_imap_upstream_without_oauth_mechanism_or_starttls_lacks_it_for_good() -> None:
    core = ImapUpstream("u@example.test")
    assert core.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n") == \
        [ReadyToAuthenticate()]
    [failed] = core.authenticate("token")
    assert isinstance(failed, UpstreamFailed) and failed.lacks == "mechanism"
    core = ImapUpstream("u@example.test", starttls=True)
    [failed] = core.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n")
    assert isinstance(failed, UpstreamFailed) and failed.lacks == "starttls"
    core = ImapUpstream("u@example.test", mechanism="oauthbearer")
    core.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi\r\n")
    [failed] = core.authenticate("token")
    assert isinstance(failed, UpstreamFailed) and failed.lacks == "mechanism"


def test_pop3_upstream_refusing_stls_lacks_it_for_good() -> None:
    core = Pop3Upstream("u@example.test", starttls=True)
    core.receive(b"+OK hi\r\n")
    [failed] = core.receive(b"-ERR unknown command\r\n")
    assert isinstance(failed, UpstreamFailed) and failed.lacks == "starttls"


async def test_status_says_permission_denied_when_the_daemon_refuses(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import tempfile

    from proxy.cli.status import STATUS_NO_DAEMON, status
    from proxy.config import Settings

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b'{"error": "permission denied"}\n')
        writer.close()

    with tempfile.TemporaryDirectory(prefix="mp") as short:  # Unix socket paths are short
        path = Path(short) / "control.sock"
        server = await asyncio.start_unix_server(refuse, path)
        try:
            settings = Settings(state_dir=tmp_path, control_socket=path)
            code = await asyncio.to_thread(status, settings, as_json=False)
            out = capsys.readouterr().out
            # Not "no daemon running": it runs and refused this user, who is told whom to ask.
            assert code != STATUS_NO_DAEMON
            assert "permission denied; run `mailproxy status` as" in out, out
        finally:
            server.close()


async def test_token_endpoint_over_https_trusts_ca_file_on_top_of_the_system_store(
        tmp_path: Path) -> None:
    import json
    import random
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from proxy.config import Account, TokenSettings
    from proxy.tokens.endpoint import TokenEndpoint
    from proxy.tokens.errors import TokenUnavailable
    from tests.support.tlsca import make_test_ca

    ca = make_test_ca(tmp_path / "ca")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"access_token": "at-https", "token_type": "Bearer",
                               "expires_in": 3600}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(ca.server_cert, ca.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        account = Account(address=KEY, provider="custom", client_id="c", scopes=[],
                          token_url=f"https://127.0.0.1:{server.server_address[1]}/token",
                          imap_server="127.0.0.1:993", ca_file=ca.ca_cert)

        def endpoint(acc: Account) -> TokenEndpoint:
            return TokenEndpoint(acc, TokenSettings(retries=0, request_timeout=5),
                                 clock=time.time, sleep=asyncio.sleep, rng=random.Random(),
                                 transport=None)

        reply = await endpoint(account).request("rt", lambda s: s)
        assert reply["access_token"] == "at-https"
        # Without ca_file the private CA is not trusted (httpx's bundled list is not used
        # either: the system's store, which does not hold it).
        with pytest.raises(TokenUnavailable, match=r"(?i)certificate"):
            await endpoint(account.model_copy(update={"ca_file": None})).request(
                "rt", lambda s: s)
    finally:
        server.shutdown()
        server.server_close()


async def test_a_login_short_of_file_descriptors_gets_a_temporary_refusal() -> None:
    from typing import cast

    from proxy.config import Account, Settings
    from proxy.login import Gate, Refusal
    from proxy.smtp.replies import refusal_reply
    from proxy.tokens.manager import TokenManager

    class NoFiles:
        """A vault whose file cannot be opened: the process is out of descriptors."""

        def exists(self, key: str) -> bool:
            return True

        def has_legacy(self, key: str) -> bool:
            return False

        def is_open(self, key: str) -> bool:
            return False

        def verified(self, key: str, password: str) -> bool:
            return False

        async def unlock(self, key: str, password: str) -> bool:
            raise OSError(errno.EMFILE, "Too many open files")

    account = Account(address=KEY, provider="custom", client_id="c", scopes=[],
                      token_url="https://token.example/t", imap_server="127.0.0.1:993")
    gate = Gate(Settings(accounts=[account]), cast(Vault, NoFiles()),
                cast(TokenManager, None))
    with pytest.raises(Refusal) as caught:
        await gate.log_in("smtp", KEY, "pw", lambda a: None, peer="10.0.0.1")  # type: ignore
    assert caught.value.kind == "unavailable" and "try again later" in caught.value.text
    assert "too many open files" in caught.value.text
    assert str(refusal_reply(caught.value)).startswith("454 4.7.0")
    assert gate.penalty.failures("10.0.0.1") == 0  # not the client's fault


async def test_logins_do_not_reread_an_unchanged_vault_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.vault import files

    vault = _vault(tmp_path)
    assert await vault.unlock(KEY, "right")
    reads: list[Path] = []
    real = files.read_file

    def counting(path: Path) -> Any:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(files, "read_file", counting)
    assert await vault.unlock(KEY, "right")  # reads once, to learn the slots of this version
    first = len(reads)
    for _ in range(20):
        assert await vault.unlock(KEY, "right")
    assert len(reads) == first  # a stat each, no read
    Vault(tmp_path).create(KEY, password="new")  # another process replaces the vault
    assert not await vault.unlock(KEY, "right")  # the change is seen
