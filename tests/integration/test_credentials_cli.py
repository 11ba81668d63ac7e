"""Issue 12, credentials: a mistyped password never becomes a slot, and `authorize` never
silently replaces a vault other devices use."""

from __future__ import annotations

import os
from pathlib import Path

from tests.integration.test_authorize_cli import account_keys, browser_env
from tests.integration.test_vault_cli import tree
from tests.support.clirun import mailproxy, write_config
from tests.support.dovecot import Dovecot
from tests.support.tokenserver import TEST_CLIENT_ID, TokenServer

MASTER = "bWFzdGVyIGtleSBtYXRlcmlhbCwgbG9uZyBlbm91Z2gh"


def test_token_import_with_a_master_key_refuses_a_mistyped_password(
        tmp_path: Path, token_server: TokenServer, dovecot: Dovecot, mail_user: str) -> None:
    config = write_config(tmp_path, token_server, dovecot, mail_user,
                          top='[vault]\nmaster_key = "env:MP_MASTER"')
    cfg = ("--config", str(config))
    env = {**os.environ, "MP_MASTER": MASTER}
    rt = token_server.authority.issue_refresh_token(mail_user, TEST_CLIENT_ID)
    done = mailproxy("token", "import", mail_user, "--no-verify", *cfg, stdin=f"{rt}\npw\npw\n",
                     env=env)
    assert done.returncode == 0, done.stderr
    before = tree(tmp_path / "state")
    done = mailproxy("token", "import", mail_user, "--no-verify", *cfg,
                     stdin=f"{rt}\nmistyped pw\n", env=env)
    assert done.returncode == 1 and "does not open the vault" in done.stderr
    assert "leave it empty to use the master key" in done.stderr
    assert tree(tmp_path / "state") == before
    listing = mailproxy("password", "list", mail_user, *cfg, env=env)
    assert [line.split()[0] for line in listing.stdout.splitlines()] == ["default", "master"]
    # Empty: the master key opens it, no slot added.
    done = mailproxy("token", "import", mail_user, "--no-verify", *cfg, stdin=f"{rt}\n\n",
                     env=env)
    assert done.returncode == 0, done.stderr
    listing = mailproxy("password", "list", mail_user, *cfg, env=env)
    assert [line.split()[0] for line in listing.stdout.splitlines()] == ["default", "master"]


def test_authorize_without_master_key_asks_for_replace(
        tmp_path: Path, token_server: TokenServer, dovecot: Dovecot, mail_user: str) -> None:
    config = write_config(tmp_path, token_server, dovecot, mail_user,
                          account=account_keys(token_server))
    cfg = ("--config", str(config))
    token_server.authority.consent_user = mail_user
    rt = token_server.authority.issue_refresh_token(mail_user, TEST_CLIENT_ID)
    done = mailproxy("token", "import", mail_user, "--no-verify", *cfg,
                     stdin=f"{rt}\nphone pw\nphone pw\n")
    assert done.returncode == 0, done.stderr
    before = tree(tmp_path / "state")
    done = mailproxy("authorize", mail_user, *cfg, stdin="other pw\nother pw\n",
                     env=browser_env())
    assert done.returncode == 2 and "--replace" in done.stderr, done.stderr
    after = tree(tmp_path / "state")
    assert {k: v for k, v in after.items() if k.endswith(".vault")} == \
        {k: v for k, v in before.items() if k.endswith(".vault")}  # the phone's still works
    # An existing password: the vault is kept, its tokens renewed.
    done = mailproxy("authorize", mail_user, *cfg, stdin="phone pw\nphone pw\n",
                     env=browser_env())
    assert done.returncode == 0, done.stderr
    # Asked for: a new vault.
    done = mailproxy("authorize", mail_user, "--replace", *cfg, stdin="other pw\nother pw\n",
                     env=browser_env())
    assert done.returncode == 0, done.stderr
    listing = mailproxy("password", "list", mail_user, *cfg)
    assert len(listing.stdout.splitlines()) == 1
