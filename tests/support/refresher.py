"""A process that refreshes one account's token with rotation as fast as it can, through the
real vault and token manager, for the crash test to SIGKILL at random points.

``python -m tests.support.refresher STATE_DIR TOKEN_URL ADDRESS`` is a fork server: it imports
everything and opens the vault with the local password (the first line on stdin) once, then for
each line on stdin forks a child that refreshes until it is killed. The child prints ``child
PID``, ``ready`` and ``refreshed`` lines; the server prints ``reaped PID STATUS`` once the child
has died, and exits at the end of stdin. Forking saves the interpreter start-up, the imports
and the scrypt of every round (most of a round's time); the vault still reads its file from
disk on every load, so each child starts from what the killed one left, with the same
syscalls as a new process."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from proxy.config import Account, TokenSettings
from proxy.tokens.manager import TokenManager
from proxy.vault import Vault
from tests.support.tokenserver import TEST_CLIENT_ID, TEST_CLIENT_SECRET


async def refresh_forever(vault: Vault, token_url: str, address: str) -> None:
    account = Account(address=address, provider="custom", client_id=TEST_CLIENT_ID,
                      client_secret=TEST_CLIENT_SECRET, token_url=token_url, scopes=["mail"],
                      imap_server="127.0.0.1:1")
    async with TokenManager([account], vault, TokenSettings(retries=0)) as manager:
        print("ready", flush=True)
        while True:
            await manager.get_token(account.key, force_refresh=True)
            print("refreshed", flush=True)


def serve(state_dir: str, token_url: str, address: str) -> None:
    vault = Vault(Path(state_dir))
    if not vault.open_with_password(address.casefold(), sys.stdin.readline().rstrip("\n")):
        raise SystemExit("the vault does not open")
    print("open", flush=True)
    for _ in sys.stdin:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                print(f"child {os.getpid()}", flush=True)
                asyncio.run(refresh_forever(vault, token_url, address))
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        print(f"reaped {pid} {status}", flush=True)


if __name__ == "__main__":
    serve(*sys.argv[1:4])
