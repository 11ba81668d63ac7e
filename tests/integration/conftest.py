"""Fixtures for integration tests against real servers.

Session-scoped: ``test_ca`` (TestCA), ``token_server`` (TokenServer), ``dovecot`` (Dovecot),
``postfix`` (Postfix, shared by the SMTP and the service tests).
Function-scoped: ``mail_user`` (a fresh ``u<hex>@example.test`` address) and the autouse
``_reset_harness``, which puts token-server settings back to defaults, clears its request
log, restarts the token/introspection listeners and Dovecot if an earlier test left them down.

Every test in this directory gets the ``integration`` marker. Without Dovecot installed the
tests that need it are skipped locally, but fail when ``CI`` is set.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dovecot import Dovecot, dovecot_available
from tests.support.postfix import Postfix, postfix_available
from tests.support.tlsca import TestCA, make_test_ca
from tests.support.tokenserver import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TokenServer

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


def _require(ok: bool, reason: str) -> None:
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: integration tests must not be skipped)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(tmp_path_factory.mktemp("test-ca"))


@pytest.fixture(scope="session")
def token_server() -> Iterator[TokenServer]:
    """Token + introspection endpoints; client TEST_CLIENT_ID/TEST_CLIENT_SECRET registered."""
    server = TokenServer()
    server.authority.register_client(TEST_CLIENT_ID, TEST_CLIENT_SECRET)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def dovecot(test_ca: TestCA, token_server: TokenServer) -> Iterator[Dovecot]:
    _require(*dovecot_available())
    # Not under pytest's tmp dir: that one is 0700 and Dovecot's unprivileged users
    # (dovecot, dovenull) must traverse this one.
    root = Path(tempfile.mkdtemp(prefix="mailproxy-dovecot-"))
    server = Dovecot(root, test_ca, token_server.introspection_url)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if os.environ.get("MAILPROXY_KEEP_DOVECOT"):
            print(f"Dovecot directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postfix(dovecot: Dovecot) -> Iterator[Postfix]:
    _require(*postfix_available())
    # Not under pytest's 0700 tmp dir: Postfix's unprivileged processes must get in.
    root = Path(tempfile.mkdtemp(prefix="mailproxy-postfix-"))
    root.chmod(0o755)
    server = Postfix(root, dovecot)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if os.environ.get("MAILPROXY_KEEP_POSTFIX"):
            print(f"Postfix directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _reset_harness(request: pytest.FixtureRequest) -> None:
    """Undo what earlier tests changed, for the session servers this test uses."""
    names = request.fixturenames
    if "token_server" in names:
        ts: TokenServer = request.getfixturevalue("token_server")
        ts.start_token_listener()
        ts.start_introspection_listener()
        ts.authority.reset_settings()
        ts.authority.reset_log()
    if "dovecot" in names:
        dc: Dovecot = request.getfixturevalue("dovecot")
        dc.ensure_running()


@pytest.fixture
def mail_user(token_server: TokenServer, _reset_harness: None) -> str:
    """A fresh, unique mailbox address; Dovecot autocreates its maildir on first login."""
    return f"u{secrets.token_hex(6)}@example.test"
