"""The pre-login dialogue for the debug log, with every credential masked.

Only a known command word (and its tag) is shown, with its arguments only for commands that
carry no secret; anything else (a password, an AUTHENTICATE argument, a base64 continuation
line, a literal, a line split across reads) shows as its length alone.
"""

from __future__ import annotations

_SAFE = {  # commands whose arguments are shown
    "imap": {"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "ID", "ENABLE", "COMPRESS"},
    "pop3": {"CAPA", "QUIT", "NOOP", "STLS", "USER", "RSET"},
}
_MASKED = {  # commands shown without their arguments
    "imap": {"LOGIN", "AUTHENTICATE"},
    "pop3": {"PASS", "AUTH", "APOP"},
}


def _line(proto: str, line: bytes) -> str:
    text = line.decode("utf-8", "replace").rstrip("\r\n")
    words = text.split(" ")
    # IMAP lines start with a tag; POP3 lines with the command.
    at = 1 if proto == "imap" else 0
    if len(words) > at:
        command = words[at].upper()
        head = " ".join(words[:at + 1])
        if command in _SAFE.get(proto, ()):
            return text[:200]
        if command in _MASKED.get(proto, ()):
            shown = words[at + 1:at + 2] if command in ("AUTHENTICATE", "AUTH") else []
            hidden = len(text) - len(" ".join([head, *shown]))
            return " ".join([head, *shown, f"[{max(0, hidden - 1)} bytes hidden]"])
    return f"[{len(text)} bytes hidden]"


def masked(proto: str, data: bytes) -> str:
    """``data`` read from a client before login, line by line, safe to log."""
    return " | ".join(_line(proto, line) for line in data.splitlines(keepends=True)) or "-"
