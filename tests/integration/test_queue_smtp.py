"""Devices and the outbound queue through the daemon, against the real Postfix and Dovecot:
250 while the server is down and delivery afterwards (with the queue's metrics and status),
DSNs, max_size, device rules, and one upstream login for many relay connections."""

from __future__ import annotations

import asyncio
import email
import email.policy
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.cli.status import status as status_command
from proxy.config import (
    Device,
    MetricsSettings,
    QueueSettings,
    Settings,
    SmtpListener,
    VaultSettings,
)
from proxy.daemon.server import Daemon
from proxy.queue import admin
from tests.integration.test_smtp_proxy import (  # noqa: F401  (fixtures)
    Raw,
    SmtpHarness,
    cutter,
    delivered,
    harness,
    message,
    plain,
    same_message,
    wait_delivered,
)
from tests.support.cutter import Cutter
from tests.support.proxyrun import LOCAL_PASSWORD

# Postfix fixtures live in test_smtp_proxy.py; imported, their names are parameters here.
# ruff: noqa: F811

# base64 of 32 random bytes: a text key that short or guessable is refused.
MASTER_KEY = "q8WZ3f0mJ6bZpQyT1vR2xN4cL7eA9sD5gH0kU3wYz6I="


def stuff(data: bytes) -> bytes:
    return data.replace(b"\r\n.", b"\r\n..")


def queue_settings(harness: SmtpHarness, address: str, *, devices: list[Device] | None = None,
                   delivery: str = "queue", master: bool = False, **account: Any) -> Settings:
    settings = harness.smtp_settings(address, **account)
    update: dict[str, Any] = {
        "smtp": SmtpListener(listen="127.0.0.1:0", delivery=delivery),  # type: ignore[arg-type]
        "queue": QueueSettings(min_free=0),
        "devices": devices or [],
    }
    if master:
        update["vault"] = VaultSettings(master_key="env:MAILPROXY_TEST_MASTER")
    # Built anew, not copied: the checks (and defaults) across tables run again.
    fields = {name: getattr(settings, name) for name in Settings.model_fields}
    return Settings(**{**fields, **update})


async def send(address: tuple[str, int], sender: str, rcpts: list[str], data: bytes, *,
               user: str | None = None, local: str | None = None) -> list[str]:
    """One message over its own connection; every reply from MAIL on."""
    if local is None:
        raw = await Raw.connect(address)
    else:
        raw = Raw(*await asyncio.open_connection(*address, local_addr=(local, 0)))
        assert (await raw.reply()).startswith("220 ")
    try:
        assert (await raw.cmd("EHLO device.example")).startswith("250")
        if user is not None:
            assert (await raw.cmd(f"AUTH PLAIN {plain(user, LOCAL_PASSWORD)}")).startswith(
                "235")
        replies = [await raw.cmd(f"MAIL FROM:<{sender}>")]
        if not replies[0].startswith("250"):
            return replies
        for rcpt in rcpts:
            replies.append(await raw.cmd(f"RCPT TO:<{rcpt}>"))
        replies.append(await raw.cmd("DATA"))
        if replies[-1].startswith("354"):
            raw.writer.write(stuff(data) + b".\r\n")
            replies.append(await raw.reply())
        await raw.cmd("QUIT")
        return replies
    finally:
        await raw.close()


async def until_empty(directory: Path, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while admin.list_messages(directory):
            await asyncio.sleep(0.05)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(daemon: Daemon) -> Samples:
    assert daemon.metrics_server.address is not None
    host, port = daemon.metrics_server.address
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://{host}:{port}/metrics")).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape_until(daemon: Daemon, name: str, want: float, timeout: float = 10.0,
                       **labels: str) -> Samples:
    """Scrapes until ``name{labels}`` is ``want`` (the queue's summary follows within ~1 s)."""
    key = (name, tuple(sorted(labels.items())))
    async with asyncio.timeout(timeout):
        while (samples := await scrape(daemon)).get(key) != want:
            await asyncio.sleep(0.1)
    return samples


async def test_twenty_messages_accepted_while_the_server_is_cut(
        harness: SmtpHarness, mail_user: str, cutter: Cutter,
        capsys: pytest.CaptureFixture[str]) -> None:
    harness.provision(mail_user)
    settings = queue_settings(harness, mail_user, smtp_port=cutter.port)
    settings.metrics = MetricsSettings(listen="127.0.0.1:0")
    cutter.refusing = True
    sent = []
    async with harness.run(settings) as daemon:
        samples = await scrape(daemon)  # an account with nothing queued shows 0
        assert samples[("mailproxy_queue_messages", (("account", mail_user),))] == 0
        assert samples[("mailproxy_queue_oldest_age_seconds", ())] == 0
        for i in range(20):
            data = message(mail_user, mail_user, f"scan {i}\r\n.dot line\r\n".encode(),
                           subject=f"cut {i}")
            replies = await send(daemon.address("smtp"), mail_user, [mail_user], data,
                                 user=mail_user)
            assert replies[-1].startswith("250 2.0.0"), replies
            sent.append(data)
        queued = admin.list_messages(settings.queue_dir)
        assert len(queued) == 20
        samples = await scrape_until(daemon, "mailproxy_queue_messages", 20, account=mail_user)
        first_age = samples[("mailproxy_queue_oldest_age_seconds", ())]
        assert first_age > 0
        # SMTP counts its client bytes as IMAP and POP3 do, when a session ends.
        assert samples[("mailproxy_relayed_bytes_total", (("direction", "in"),
                                                          ("protocol", "smtp")))] \
            > sum(len(data) for data in sent)
        assert samples[("mailproxy_relayed_bytes_total", (("direction", "out"),
                                                          ("protocol", "smtp")))] > 0
        async with asyncio.timeout(20):  # the worker tried and holds back
            while not (await daemon._control("status"))["accounts"][0]["queue"].get(
                    "last_error"):
                await asyncio.sleep(0.1)
        status = (await daemon._control("status"))["accounts"][0]["queue"]
        assert status["queued"] == 20 and status["oldest_age"] >= 0
        assert "cannot reach" in status["last_error"]
        # `mailproxy status` (over the control socket, in a thread: the daemon answers on
        # this loop) as a person reads it: count, oldest age, last delivery error.
        capsys.readouterr()
        await asyncio.to_thread(status_command, settings, as_json=False)
        text = capsys.readouterr().out
        assert "\n  queue: 20 message(s), oldest " in text, text
        assert "\n  queue last error: " in text and "cannot reach" in text, text
        later = await scrape(daemon)
        assert later[("mailproxy_queue_oldest_age_seconds", ())] > first_age
        assert delivered(harness.dovecot, mail_user) == []
        cutter.refusing = False
        assert admin.retry(settings.queue_dir, None) >= 1  # `mailproxy queue retry --all`
        found = await wait_delivered(harness.dovecot, mail_user, 20)
        await until_empty(settings.queue_dir)
        samples = await scrape_until(daemon, "mailproxy_queue_messages", 0, account=mail_user)
        assert samples[("mailproxy_queue_oldest_age_seconds", ())] == 0
    for data in sent:
        assert sum(same_message(stored, data) for stored in found) == 1


async def test_unknown_recipient_gives_a_dsn_with_the_original_headers(
        harness: SmtpHarness, mail_user: str) -> None:
    harness.provision(mail_user)
    settings = queue_settings(harness, mail_user)
    data = message(mail_user, "nobody@example.test", b"scan\r\n", subject="Invoice 9")
    async with harness.run(settings) as daemon:
        replies = await send(daemon.address("smtp"), mail_user, ["nobody@example.test"], data,
                             user=mail_user)
        assert replies[-1].startswith("250 2.0.0")
        (report,) = await wait_delivered(harness.dovecot, mail_user, 1)
        await until_empty(settings.queue_dir)
    parsed = email.message_from_bytes(report, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    _, status, headers = parsed.get_payload()
    fields = status.get_payload()[1]
    assert fields["Status"] == "5.1.1" and fields["Action"] == "failed"
    assert fields["Final-Recipient"] == "rfc822; nobody@example.test"
    assert "Subject: Invoice 9" in headers.get_payload()


async def test_max_size_gives_452_and_keeps_the_queue(
        harness: SmtpHarness, mail_user: str, cutter: Cutter) -> None:
    harness.provision(mail_user)
    settings = queue_settings(harness, mail_user, smtp_port=cutter.port)
    settings = settings.model_copy(update={"queue": QueueSettings(max_size=25_000, min_free=0)})
    cutter.refusing = True
    body = (b"x" * 70 + b"\r\n") * 140  # ~10 KB
    async with harness.run(settings) as daemon:
        accepted, refused = [], []
        for i in range(4):
            data = message(mail_user, mail_user, body, subject=f"big {i}")
            replies = await send(daemon.address("smtp"), mail_user, [mail_user], data,
                                 user=mail_user)
            (accepted if replies[-1].startswith("250") else refused).append((data, replies))
        assert len(accepted) == 2 and len(refused) == 2
        assert all(r[-1].startswith("452 4.3.1") for _, r in refused)
        assert len(admin.list_messages(settings.queue_dir)) == 2
        cutter.refusing = False
        admin.retry(settings.queue_dir, None)
        found = await wait_delivered(harness.dovecot, mail_user, 2)
    for data, _ in accepted:
        assert sum(same_message(stored, data) for stored in found) == 1


@pytest.fixture
def master_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MAILPROXY_TEST_MASTER", MASTER_KEY)
    return MASTER_KEY


@pytest.mark.parametrize("delivery", ["queue", "relay"])
async def test_device_rules(harness: SmtpHarness, mail_user: str, master_key: str,
                            delivery: str) -> None:
    harness.provision(mail_user, master_key=master_key.encode())
    scanner = Device(name="scanner", networks=["127.0.0.1"], account=mail_user,
                     delivery=delivery)  # type: ignore[arg-type]
    settings = queue_settings(harness, mail_user, devices=[scanner], delivery="relay",
                              master=True)
    data = message(mail_user, mail_user, b"from the scanner\r\n", subject="device")
    async with harness.run(settings) as daemon:
        address = daemon.address("smtp")
        replies = await send(address, mail_user, [mail_user], data, local="127.0.0.1")
        assert replies[-1].startswith("250"), replies
        # Another address: not the device, and no AUTH.
        other = await send(address, mail_user, [mail_user], data, local="127.0.0.2")
        assert other[0].startswith("530 5.7.0"), other
        # The device with a sender outside its list.
        wrong = await send(address, "someone-else@example.test", [mail_user], data,
                           local="127.0.0.1")
        assert wrong[0].startswith("550 5.7.1") and "scanner" in wrong[0], wrong
        # AUTH with the local password still works from anywhere.
        authed = await send(address, mail_user, [mail_user], data, user=mail_user,
                            local="127.0.0.2")
        assert authed[-1].startswith("250"), authed
        found = await wait_delivered(harness.dovecot, mail_user, 2)
    assert all(same_message(stored, data) for stored in found)


async def test_relay_mode_ten_connections_one_upstream_login(
        harness: SmtpHarness, mail_user: str, cutter: Cutter) -> None:
    harness.provision(mail_user)
    settings = queue_settings(harness, mail_user, delivery="relay", smtp_port=cutter.port)
    async with harness.run(settings) as daemon:
        for i in range(10):
            data = message(mail_user, mail_user, b"pooled\r\n", subject=f"pool {i}")
            replies = await send(daemon.address("smtp"), mail_user, [mail_user], data,
                                 user=mail_user)
            assert replies[-1].startswith("250"), replies
        await wait_delivered(harness.dovecot, mail_user, 10)
    assert cutter.connections == 1
