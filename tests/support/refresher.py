"""A process that refreshes one account's token with rotation as fast as it can, through the
real vault and token manager: ``python -m tests.support.refresher STATE_DIR TOKEN_URL ADDRESS``
(the local password on stdin). The crash test SIGKILLs it at random points."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from proxy.config import Account, TokenSettings
from proxy.tokens.manager import TokenManager
from proxy.vault import Vault
from tests.support.tokenserver import TEST_CLIENT_ID, TEST_CLIENT_SECRET


async def main(state_dir: str, token_url: str, address: str, password: str) -> None:
    vault = Vault(Path(state_dir))
    if not vault.open_with_password(address.casefold(), password):
        raise SystemExit("the vault does not open")
    account = Account(address=address, provider="custom", client_id=TEST_CLIENT_ID,
                      client_secret=TEST_CLIENT_SECRET, token_url=token_url, scopes=["mail"],
                      imap_server="127.0.0.1:1")
    async with TokenManager([account], vault, TokenSettings(retries=0)) as manager:
        print("ready", flush=True)
        while True:
            await manager.get_token(account.key, force_refresh=True)
            print("refreshed", flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4], sys.stdin.readline().rstrip("\n")))
