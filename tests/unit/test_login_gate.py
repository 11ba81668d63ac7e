"""``Gate`` with fakes for the vault, the token manager and the upstream: what a login leaves
behind when it fails."""

from __future__ import annotations

import asyncio
import gc
from typing import Any, cast

from proxy.config import Settings
from proxy.login import Gate, Refusal, UpstreamError, UpstreamRejection
from proxy.tokens.errors import TokenUnavailable
from proxy.tokens.manager import TokenManager
from proxy.vault import Vault

ADDRESS = "a@example.test"


class _Vault:
    def exists(self, key: str) -> bool:
        return True

    def has_legacy(self, key: str) -> bool:
        return False

    def is_open(self, key: str) -> bool:
        return True

    async def unlock(self, key: str, password: str) -> bool:
        return True

    def verified(self, key: str, password: str) -> bool:
        return False


class _Tokens:
    async def get_token(self, key: str, rejected: str | None = None) -> Any:
        await asyncio.sleep(0.01)  # the connect fails first
        raise TokenUnavailable(key, "cannot reach the token endpoint")


class _Upstream:
    description = "imap.example.test:993"

    async def connect(self) -> None:
        raise UpstreamError("connection refused")

    async def authenticate(self, token: str) -> UpstreamRejection | None:
        raise AssertionError("not reached")

    def close(self) -> None:
        pass


async def test_a_failed_connect_is_retrieved_when_the_token_fails_too() -> None:
    # Found by bench/fuzz.py: asyncio logged "Task exception was never retrieved" with a
    # traceback for every login whose token request and upstream connect both failed.
    unretrieved: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unretrieved.append(ctx))
    settings = Settings(accounts=[{"address": ADDRESS, "provider": "custom", "client_id": "c",
                                   "token_url": "https://t.example.test/token", "scopes": [],
                                   "imap_server": "imap.example.test:993"}])
    gate = Gate(settings, cast(Vault, _Vault()), cast(TokenManager, _Tokens()))
    kind = ""
    try:
        await gate.log_in("imap", ADDRESS, "pw", lambda account: _Upstream())
    except Refusal as refusal:  # not pytest.raises: its traceback would keep the task alive
        kind = refusal.kind
    assert kind == "unavailable"
    await asyncio.sleep(0)
    gc.collect()
    assert unretrieved == []
