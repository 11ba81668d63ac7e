"""SIGKILL at random points while tokens are refreshed with rotation, many times over: the
vault on disk is always the old state or the new one, readable, never partial or empty, and
the refresh token in it still works."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from proxy.tokens.store import TokenState
from proxy.vault import Vault
from tests.support.clirun import ROOT
from tests.support.tokenserver import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TokenServer

KILLS = 50
PASSWORD = "crash test pw"


def check_vault(state: Path, key: str) -> str:
    """Every vault file parses and opens; returns the stored refresh token."""
    vault_dir = state / "vault"
    for path in vault_dir.iterdir():
        if path.name.endswith(".vault"):
            data = path.read_bytes()
            assert data, f"{path} is empty"
            json.loads(data)  # never partial
    vault = Vault(state)
    assert vault.open_with_password(key, PASSWORD)
    loaded = vault.load(key)
    assert loaded.refresh_token, "the refresh token is gone"
    return loaded.refresh_token


def test_sigkill_during_rotating_refreshes(tmp_path: Path, token_server: TokenServer,
                                           mail_user: str) -> None:
    authority = token_server.authority
    authority.rotate_refresh_tokens = True
    # Like Microsoft: a rotated-away refresh token keeps working until its successor is used,
    # so the client that crashed before saving the successor loses nothing.
    authority.retire_rotated_on_first_use = True
    state = tmp_path / "state"
    first = authority.issue_refresh_token(mail_user, TEST_CLIENT_ID)
    Vault(state).create(mail_user, password=PASSWORD, state=TokenState(refresh_token=first))
    rng = random.Random(int.from_bytes(os.urandom(4)))
    seen = {first}
    refreshes = 0
    errors = tmp_path / "refresher.err"
    with errors.open("w") as err:
        server = subprocess.Popen(
            [sys.executable, "-m", "tests.support.refresher", str(state),
             token_server.token_url, mail_user], cwd=ROOT, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=err, text=True)
    assert server.stdin is not None and server.stdout is not None
    try:
        server.stdin.write(PASSWORD + "\n")
        server.stdin.flush()
        assert server.stdout.readline() == "open\n", errors.read_text()
        for _ in range(KILLS):
            server.stdin.write("go\n")
            server.stdin.flush()
            first = server.stdout.readline()
            assert first.startswith("child "), first + errors.read_text()
            child = int(first.split()[1])
            assert server.stdout.readline() == "ready\n", errors.read_text()
            # Wait for the first refresh, then kill somewhere in a later refresh cycle.
            assert server.stdout.readline() == "refreshed\n", errors.read_text()
            refreshes += 1
            time.sleep(rng.uniform(0.0, 0.25))
            os.kill(child, signal.SIGKILL)
            while (line := server.stdout.readline()) == "refreshed\n":
                refreshes += 1
            assert line == f"reaped {child} {signal.SIGKILL}\n", line + errors.read_text()
            assert "Traceback" not in errors.read_text(), errors.read_text()
            stored = check_vault(state, mail_user)
            seen.add(stored)
    finally:
        server.stdin.close()
        server.wait(timeout=10)
    print(f"{KILLS} kills, {refreshes} refreshes, {len(seen)} distinct stored tokens")
    assert len(seen) > KILLS // 2  # the stored token moved on between kills
    # The proxy starts again with a refresh token that works.
    stored = check_vault(state, mail_user)
    reply = httpx.post(token_server.token_url, data={
        "grant_type": "refresh_token", "refresh_token": stored, "client_id": TEST_CLIENT_ID,
        "client_secret": TEST_CLIENT_SECRET})
    assert reply.status_code == 200, reply.text
    assert Vault(state).sweep_temporary(older_than=0) >= 0
    assert not [p for p in (state / "vault").iterdir() if p.name.endswith(".tmp")]
