"""``transaction.Relay`` with a fake upstream: what the client hears when the upstream is lost."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from proxy.config import Account, Settings
from proxy.login import Gate
from proxy.observe import Observer
from proxy.smtp.transaction import Relay
from proxy.smtp.upstream import SmtpUpstreamSession, UpstreamGone

ACCOUNT = Account(address="a@example.test", provider="custom", client_id="x",
                  token_url="https://t.example/token", smtp_server="smtp.example:587",
                  scopes=[])


class _Upstream:
    description = "smtp.example:587"
    connected = True

    async def finish_data(self) -> Any:
        raise UpstreamGone("connection reset by peer")

    def close(self) -> None:
        pass


async def test_lost_after_the_end_of_data_says_the_message_may_have_been_sent() -> None:
    # It said "nothing was sent": the upstream had the whole message and may have delivered
    # it, so a client retrying without a word sends it twice.
    gate = cast(Gate, SimpleNamespace(observer=Observer()))
    relay = Relay(ACCOUNT, cast(SmtpUpstreamSession, _Upstream()), gate, Settings())
    reply = await relay.finish(100)
    assert reply.startswith("451 4.4.2 ") and "may have been sent" in reply, reply
    assert "nothing was sent" not in reply
