"""SMTP reply texts: the ``Reply`` type, upstream replies passed through, login refusals,
enhanced status codes. Pure functions (no I/O), so the reply mapping is tested on its own.
"""

from __future__ import annotations

import re

from ..login import Refusal

# RFC 2034: once ENHANCEDSTATUSCODES is advertised every reply carries one, except the
# greeting, the HELO/EHLO answers and the 334/354 continuations.
_NO_ENHANCED = {220, 334, 354}
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")
_DEFAULT_ENHANCED = {
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 535: "5.7.8", 538: "5.7.11", 550: "5.1.0", 552: "5.3.4", 553: "5.1.3",
    554: "5.0.0", 555: "5.5.4", 421: "4.3.2", 451: "4.3.0", 452: "4.5.3", 454: "4.7.0",
}
# Keep reply lines well inside the 512 octets RFC 5321 allows.
_MAX_TEXT = 400

MICROSOFT_SMTP_AUTH_DISABLED = (
    "Microsoft 365 has SMTP AUTH switched off for this mailbox or tenant: an Exchange "
    "administrator must turn on Authenticated SMTP for the mailbox (Microsoft 365 admin "
    "center: the user's Mail > Manage email apps, or Set-CASMailbox -Identity <address> "
    "-SmtpClientAuthenticationDisabled $false) and must not have it disabled for the tenant "
    "(Set-TransportConfig -SmtpClientAuthenticationDisabled $false)."
)


class Reply(str):
    """A complete reply as the client gets it (lines joined by CRLF, without the final CRLF),
    which knows its code. What every ``transaction.Transaction`` answers with."""

    __slots__ = ()

    @property
    def code(self) -> int:
        return int(self[:3])


def enhanced_default(code: int) -> str:
    if code in _DEFAULT_ENHANCED:
        return _DEFAULT_ENHANCED[code]
    return f"{code // 100}.0.0"


def add_enhanced_codes(reply: str) -> str:
    """Give every line of a reply an enhanced status code if it has none (RFC 2034)."""
    lines = reply.split("\r\n")
    out = []
    for line in lines:
        head, text = line[:4], line[4:]
        if len(head) < 3 or not head[:3].isdigit():
            out.append(line)
            continue
        code = int(head[:3])
        if code in _NO_ENHANCED or _ENHANCED.match(text):
            out.append(line)
            continue
        sep = head[3:4] or " "
        out.append(f"{code}{sep}{enhanced_default(code)} {text}".rstrip())
    return "\r\n".join(out)


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets, CRLF included.
MAX_REPLY_LINE = 510


def well_formed(reply: str) -> str:
    """``reply`` with only printable ASCII on its lines (a client's control or 8-bit bytes
    echoed in a reply become "?") and no line over 512 octets."""
    lines = []
    for line in reply.split("\r\n"):
        line = _UNPRINTABLE.sub("?", line)
        if len(line) > MAX_REPLY_LINE:
            line = line[:MAX_REPLY_LINE - 3] + "..."
        lines.append(line)
    return "\r\n".join(lines)


def _wrap(text: str) -> list[str]:
    lines: list[str] = []
    for part in text.split("\n"):
        part = part.strip()
        while len(part) > _MAX_TEXT:
            cut = part.rfind(" ", 0, _MAX_TEXT)
            if cut <= 0:
                cut = _MAX_TEXT
            lines.append(part[:cut])
            part = part[cut:].strip()
        lines.append(part)
    return lines or [""]


def format_reply(code: int, text: str, enhanced: str | None = None) -> Reply:
    """A reply of one or more lines (``250-...`` then ``250 ...``) without the final CRLF.

    ``text`` may hold several lines separated by "\\n" (aiosmtplib joins a multi-line reply
    that way); each line keeps its own enhanced code. ``enhanced`` is put in front of
    lines that have none.
    """
    lines = _wrap(text)
    out = []
    for i, line in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        if enhanced and not _ENHANCED.match(line):
            line = f"{enhanced} {line}".rstrip()
        out.append(f"{code}{sep}{line}".rstrip())
    return Reply(add_enhanced_codes("\r\n".join(out)))


def refusal_reply(refusal: Refusal) -> Reply:
    """A failed login as an SMTP reply: 454 when worth retrying, 535 when a person must act."""
    text = " ".join(refusal.text.split())
    if refusal.kind == "unavailable":
        return format_reply(454, text, "4.7.0")
    if refusal.kind == "misconfigured":  # not the password's fault: 554, not 535
        return format_reply(554, text, "5.7.0")
    if refusal.kind == "rejected" and "5.7.139" in text:
        return format_reply(535, f"{text}\n{MICROSOFT_SMTP_AUTH_DISABLED}", "5.7.139")
    return format_reply(535, text, "5.7.8")
