"""DSNs (RFC 3464) as a mail reader parses them, and the sending-limit arithmetic."""

from __future__ import annotations

import email
import email.policy

import pytest

from proxy.queue import dsn
from proxy.queue.ratelimit import DAY, Limits, RateLimiter


def unstuff(data: bytes) -> bytes:
    return data.replace(b"\r\n..", b"\r\n.")


def test_dsn_is_a_well_formed_delivery_report() -> None:
    headers = b"From: scanner@example.com\r\nTo: nobody@example.net\r\nSubject: Scan 42\r\n" \
              b".Dotted: yes\r\n"
    data = dsn.build(
        reporting_host="proxy.local", account_address="office@example.com",
        sender="scanner@example.com", headers=headers, received=1_700_000_000,
        now=1_700_000_100, message_id="ABC",
        failures=[dsn.Failure("nobody@example.net",
                              "550 5.1.1 <nobody@example.net>: Recipient address rejected",
                              "5.1.1"),
                  dsn.Failure("late@example.net", "not delivered within 5 day(s)", "4.4.7",
                              remote=False)])
    assert b"\r\n.Dotted" not in data and b"\r\n..Dotted" in data  # stored dot-stuffed
    message = email.message_from_bytes(unstuff(data), policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["To"].addresses[0].addr_spec == "scanner@example.com"
    assert message["From"].addresses[0].addr_spec == "office@example.com"
    assert message["Auto-Submitted"] == "auto-replied"
    human, status, original = message.get_payload()
    assert human.get_content_type() == "text/plain"
    assert "nobody@example.net" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, first, second = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; proxy.local"
    assert first["Final-Recipient"] == "rfc822; nobody@example.net"
    assert first["Action"] == "failed" and first["Status"] == "5.1.1"
    assert first["Diagnostic-Code"] == \
        "smtp; 550 5.1.1 <nobody@example.net>: Recipient address rejected"
    assert second["Status"] == "4.4.7" and second["Action"] == "failed"
    assert original.get_content_type() == "text/rfc822-headers"
    assert original.get_payload() == headers.decode()


@pytest.mark.parametrize("reply, status", [
    ("550 5.1.1 <x>: Recipient address rejected", "5.1.1"),
    ("554 Transaction failed", "5.0.0"),
    ("452 4.5.3 Too many recipients", "4.5.3"),
    ("550 5.7.60 SMTP; Client does not have permissions", "5.7.60"),
])
def test_status_of(reply: str, status: str) -> None:
    assert dsn.status_of(reply) == status


def test_per_minute_limit() -> None:
    limiter = RateLimiter(Limits(messages_per_minute=3))
    for t in (0.0, 10.0, 20.0):
        assert limiter.delay(t, 1) == 0
        limiter.record(t, 1)
    assert limiter.delay(30.0, 1) == pytest.approx(30.0)  # the message at 0 leaves at 60
    assert limiter.delay(60.0, 1) == 0


def test_messages_per_day_and_history() -> None:
    history = [(float(i), 1) for i in range(5)]
    limiter = RateLimiter(Limits(messages_per_day=5), history)
    assert limiter.delay(100.0, 1) == pytest.approx(DAY - 100.0)
    assert limiter.delay(DAY + 0.5, 1) == 0


def test_recipients_per_day() -> None:
    limiter = RateLimiter(Limits(recipients_per_day=10))
    limiter.record(0.0, 6)
    limiter.record(50.0, 3)
    assert limiter.delay(100.0, 1) == 0
    assert limiter.delay(100.0, 2) == pytest.approx(DAY - 100.0)  # the 6 must leave first
    assert limiter.delay(100.0, 5) == pytest.approx(DAY - 100.0)
    # More than the whole day's allowance: goes once the window is empty.
    assert limiter.delay(100.0, 50) == pytest.approx(DAY + 50.0 - 100.0)
    assert RateLimiter(Limits()).delay(0.0, 10_000) == 0
