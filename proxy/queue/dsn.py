"""Delivery status notifications (RFC 3464): the ``multipart/report`` sent back to the envelope
sender when recipients failed for good. Pure functions: bytes in, bytes out."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class Failure:
    recipient: str
    reply: str  # the server's reply in one line ("550 5.1.1 <x>: Recipient address rejected"),
    # or our own words for an expiry
    status: str  # the enhanced status code: 5.1.1, or 4.4.7 for an expired message
    remote: bool = True  # the reply came from the server (Diagnostic-Code: smtp; ...)


def status_of(reply: str, default_class: str = "5") -> str:
    """The enhanced status code in a reply, or the class's generic one (RFC 3463)."""
    match = _ENHANCED.search(reply[4:] if reply[:3].isdigit() else reply)
    if match:
        return ".".join(match.groups())
    if reply[:1] in ("4", "5"):
        return f"{reply[0]}.0.0"
    return f"{default_class}.0.0"


def _clean(text: str) -> str:
    return " ".join(_CONTROL.sub(" ", text).split())


def _addr(address: str) -> str:
    return _clean(address).replace(">", "").replace("<", "")


def build(*, reporting_host: str, account_address: str, sender: str, failures: list[Failure],
          headers: bytes, received: float, now: float, message_id: str) -> bytes:
    """The DSN as it is stored in the queue (dot-stuffed: lines starting with "." doubled).

    ``headers``: the original message's header section (un-stuffed), attached as
    ``text/rfc822-headers``. From is the account's address: providers refuse other senders.
    """
    boundary = f"=_mailproxy_{secrets.token_hex(12)}"
    date = format_datetime(datetime.fromtimestamp(now, UTC))
    arrival = format_datetime(datetime.fromtimestamp(received, UTC))
    host = _clean(reporting_host) or "localhost"
    expired = any(not f.remote for f in failures)
    human = [
        "This is the mail system at " + host + " (mailproxy).",
        "",
        "Your message could not be delivered to the following recipient(s)"
        + (" within the time the queue keeps a message." if expired else "."),
        "It was accepted for " + _addr(account_address) + " and tried through that account's "
        "mail server, which gave the reply shown for each recipient.",
        "",
    ]
    for failure in failures:
        human.append(f"<{_addr(failure.recipient)}>: {_clean(failure.reply)}")
    human += ["", "The headers of your message are attached.", ""]
    status = [f"Reporting-MTA: dns; {host}", f"X-Mailproxy-Queue-ID: {message_id}",
              f"Arrival-Date: {arrival}", ""]
    for failure in failures:
        status += [f"Final-Recipient: rfc822; {_addr(failure.recipient)}",
                   "Action: failed",
                   f"Status: {failure.status}"]
        if failure.remote:
            status.append(f"Diagnostic-Code: smtp; {_clean(failure.reply)}")
        else:
            status.append(f"Diagnostic-Code: x-mailproxy; {_clean(failure.reply)}")
        status += [f"Last-Attempt-Date: {date}", ""]
    top = [
        f"From: Mail Delivery System <{_addr(account_address)}>",
        f"To: <{_addr(sender)}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {date}",
        f"Message-ID: <{secrets.token_hex(12)}.dsn@{host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "Content-Description: Notification",
        "",
        *human,
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        *status,
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "Content-Description: Undelivered message headers",
        "",
    ]
    body = "\r\n".join(top).encode("utf-8", "surrogateescape") + b"\r\n"
    if headers and not headers.endswith(b"\r\n"):
        headers += b"\r\n"
    body += headers + f"\r\n--{boundary}--\r\n".encode()
    return stuff(body)


def stuff(message: bytes) -> bytes:
    """Dot-stuff a message (RFC 5321 4.5.2): a line starting with "." gets one more."""
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..")
