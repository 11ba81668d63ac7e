"""Reply checkers for the fuzzer: one per protocol, fed what a connection sent and received.

Each checker follows the client's side of one connection: ``sent`` gets every byte written,
``received`` every byte read, ``closed`` is called at the daemon's EOF. They return problems as
short strings (empty list: all well) and say with ``settled`` whether every reply due so far has
arrived. POP3 and SMTP answer each LF-terminated line with exactly one reply, so their checkers
pair lines with replies; IMAP replies are matched by tag (the fuzzer's probe) instead.

After the go-ahead to STARTTLS (STLS) the daemon expects a TLS handshake: the checkers then
allow nothing in the clear (a reply there means a command sent before the go-ahead ran: the
STARTTLS injection class), only TLS records (an alert), and the close that must follow.
"""

from __future__ import annotations

import re

# Printable US-ASCII: a reply line may hold nothing else (no 8-bit, no control bytes).
_PRINTABLE = re.compile(rb"[\x20-\x7e]*")
_IMAP_TAGGED = re.compile(rb"([^ ]+) (OK|NO|BAD) (.+)")
_IMAP_UNTAGGED = re.compile(rb"\* [^ ].*")
# RFC 3501 ASTRING-CHAR minus "+": what a tag may hold.
_TAG_BAD = frozenset(b'(){ %*"\\+') | frozenset(range(0x20)) | frozenset(range(0x7F, 0x100))
# How the daemon's go-ahead to STARTTLS (STLS) begins: a reply that only pairs with the
# command (tags repeat) must not be taken for it.
_GO_AHEAD = b"Begin TLS"
_SMTP_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])(.*)")
_ENHANCED = re.compile(rb"([245])\.[0-9]{1,3}\.[0-9]{1,3}(?: |$)")
SMTP_MAX_REPLY_LINE = 512  # RFC 5321 4.5.3.1.5, CRLF included
POP3_MAX_REPLY_LINE = 512  # RFC 2449 section 4, CRLF included


def tls_problem(data: bytes) -> str | None:
    """``data`` came after the STARTTLS go-ahead: TLS records (an alert) or nothing."""
    if not data or (data[0] in (0x15, 0x16) and data[1:2] in (b"", b"\x03")):
        return None
    return f"bytes in the clear after the STARTTLS go-ahead (a command sent before it ran?): " \
        f"{data[:120]!r}"


def valid_imap_tag(tag: bytes) -> bool:
    return bool(tag) and not any(c in _TAG_BAD for c in tag)


def _line_problem(line: bytes) -> str | None:
    """``line`` is one reply line without its LF: it must end in CR and be printable ASCII."""
    if not line.endswith(b"\r"):
        return "reply line ends in a bare LF"
    if not _PRINTABLE.fullmatch(line, 0, len(line) - 1):
        return "reply holds 8-bit or control bytes"
    return None


class _Lines:
    """Splits a byte stream into LF-terminated lines."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        lines: list[bytes] = []
        start = 0
        while (end := self.buf.find(b"\n", start)) >= 0:
            lines.append(bytes(self.buf[start:end]))
            start = end + 1
        del self.buf[:start]
        return lines

    def rest(self) -> bytes:
        data, self.buf = bytes(self.buf), bytearray()
        return data


class ImapChecker:
    """IMAP: tagged, untagged and continuation lines; tags must be ones the client sent."""

    protocol = "imap"

    def __init__(self) -> None:
        self._in = _Lines()
        self._out = _Lines()
        self._tags: set[bytes] = set()
        self._waiting: bytes | None = None  # probe tag whose completion is due
        self._greeted = False
        self._bye = False
        self._starttls: set[bytes] = set()  # tags of STARTTLS commands
        self.starttls_sent = False
        self.tls = False  # the go-ahead to STARTTLS came: a handshake is due, no more text
        self.replies = 0

    def probe(self, n: int) -> bytes:
        tag = b"P%d" % n
        self._waiting = tag
        # The line end first: it ends a line an input left open, or answers a continuation
        # request, so that the probe is read as a command.
        return b"\r\n" + tag + b" NOOP\r\n"

    def sent(self, data: bytes) -> None:
        for line in self._out.feed(data):
            words = line.removesuffix(b"\r").split(b" ", 2)
            self._tags.add(words[0])
            if len(words) > 1 and words[1].upper() == b"STARTTLS":
                self._starttls.add(words[0])  # the daemon decides if it is one
                self.starttls_sent = True

    def settled(self) -> bool:
        return self._greeted and self._waiting is None and not self.tls

    def received(self, data: bytes) -> list[str]:
        if self.tls:
            problem = tls_problem(data)
            return [problem] if problem else []
        problems: list[str] = []
        lines = self._in.feed(data)
        for i, raw in enumerate(lines):
            self.replies += 1
            problem = _line_problem(raw)
            structure = self._check(raw.removesuffix(b"\r"))
            if problem or structure:
                problems.append(f"{problem or structure}: {raw[:120]!r}")
            if self.tls:
                rest = b"".join(line + b"\n" for line in lines[i + 1:]) + self._in.rest()
                problem = tls_problem(rest)
                return problems + ([problem] if problem else [])
        return problems

    def _check(self, line: bytes) -> str | None:
        if not self._greeted:
            self._greeted = True
            return None if line.startswith(b"* OK ") else "greeting is not * OK"
        if line.startswith(b"+"):
            return None if line == b"+" or line.startswith(b"+ ") else "bad continuation"
        if line.startswith(b"*"):
            if not _IMAP_UNTAGGED.fullmatch(line):
                return "malformed untagged reply"
            if line.startswith(b"* BYE"):
                self._bye = True
            return None
        match = _IMAP_TAGGED.fullmatch(line)
        if match is None:
            return "malformed tagged reply"
        tag = match.group(1)
        if tag == self._waiting:
            self._waiting = None
        if not valid_imap_tag(tag):
            return "reply tagged with an invalid tag"
        if tag not in self._tags:
            return "reply tagged with a tag the client never sent"
        text = match.group(3)
        if text.startswith(b"[") and b"]" not in text:
            return "unterminated response code"
        if tag in self._starttls and match.group(2) == b"OK" and text.startswith(_GO_AHEAD):
            self.tls = True
        return None

    def closed(self) -> list[str]:
        problems = []
        if self._in.buf:
            problems.append(f"connection closed mid-line: {bytes(self._in.buf[:120])!r}")
        if self._greeted and not self._bye and not self.tls:
            problems.append("connection closed without * BYE")
        return problems


class _Paired:
    """POP3 and SMTP: every LF-terminated client line gets exactly one reply, in order."""

    protocol = ""

    def __init__(self) -> None:
        self._in = _Lines()
        self._out = _Lines()
        self.pending: list[bytes] = []  # client lines not answered yet
        self._greeted = False
        self._continuation = False  # the last reply asked for a SASL response line
        self.tls = False  # the go-ahead to STARTTLS (STLS) came: a handshake is due
        self.starttls_sent = False
        self.replies = 0

    def probe(self, n: int) -> bytes:
        # The line end first (see ImapChecker.probe): an empty command line, answered too.
        return b"\r\nNOOP\r\n"

    def sent(self, data: bytes) -> None:
        lines = self._out.feed(data)
        self.pending += lines
        self.starttls_sent = self.starttls_sent or any(
            line.split(b" ", 1)[0].removesuffix(b"\r").upper() in (b"STARTTLS", b"STLS")
            for line in lines)

    def settled(self) -> bool:
        return self._greeted and not self.pending and not self.tls

    def _go_ahead(self, command: bytes, ok: bool, verb: bytes) -> None:
        if ok and command.split(b" ", 1)[0].removesuffix(b"\r").upper() == verb:
            self.tls = True
            self.pending.clear()  # read by no one: dropped before the handshake

    def _feed(self, data: bytes) -> tuple[list[bytes], list[str]]:
        """The reply lines in ``data`` up to the go-ahead, and the problems after it."""
        if self.tls:
            problem = tls_problem(data)
            return [], [problem] if problem else []
        return self._in.feed(data), []

    def _after_go_ahead(self, lines: list[bytes], i: int) -> list[str]:
        rest = b"".join(line + b"\n" for line in lines[i + 1:]) + self._in.rest()
        problem = tls_problem(rest)
        return [problem] if problem else []


class Pop3Checker(_Paired):
    """POP3: ``+OK``/``-ERR``/``+ `` status lines, multi-line answers to CAPA and bare AUTH."""

    protocol = "pop3"

    def __init__(self) -> None:
        super().__init__()
        self._body = False  # inside a multi-line answer
        self._extra = 0  # replies with no client line to answer (allowed once, before a close)

    def _multiline(self, command: bytes) -> bool:
        # As the daemon reads a command: a keyword of up to 4 ASCII letters, then arguments.
        keyword, _, rest = command.removesuffix(b"\r").partition(b" ")
        if not (keyword.isalpha() and keyword.isascii() and len(keyword) <= 4):
            return False
        keyword = keyword.upper()
        return keyword == b"CAPA" or (keyword == b"AUTH" and not rest.split())

    def received(self, data: bytes) -> list[str]:
        lines, problems = self._feed(data)
        for i, raw in enumerate(lines):
            problem = _line_problem(raw)
            if problem is None and len(raw) + 1 > POP3_MAX_REPLY_LINE:
                problem = f"reply line of {len(raw) + 1} octets"
            # The reply is taken into account even when it is malformed: later ones pair up.
            structure = self._check(raw.removesuffix(b"\r"))
            if problem or structure:
                problems.append(f"{problem or structure}: {raw[:120]!r}")
            if self.tls:
                return problems + self._after_go_ahead(lines, i)
        return problems

    def _check(self, line: bytes) -> str | None:
        if self._body:
            if line == b".":
                self._body = False
            elif line.startswith(b"."):
                return "multi-line answer with an unstuffed dot"
            return None
        self.replies += 1
        ok = line == b"+OK" or line.startswith(b"+OK ")
        err = line == b"-ERR" or line.startswith(b"-ERR ")
        cont = line == b"+" or line.startswith(b"+ ")
        if not self._greeted:
            self._greeted = True
            return None if ok else "greeting is not +OK"
        if not (ok or err or cont):
            return "status line is neither +OK, -ERR nor +"
        if not self.pending:
            self._extra += 1
            return None if self._extra == 1 else "reply with no command to answer"
        command = self.pending.pop(0)
        sasl, self._continuation = self._continuation, cont
        if cont and (sasl or not command.upper().startswith(b"AUTH")):
            return "+ continuation to something other than AUTH"
        if ok and not sasl and self._multiline(command):
            self._body = True
        if not sasl:
            self._go_ahead(command, ok and line[4:].startswith(_GO_AHEAD), b"STLS")
        return None

    def closed(self) -> list[str]:
        problems = []
        if self._in.buf:
            problems.append(f"connection closed mid-line: {bytes(self._in.buf[:120])!r}")
        if self._body:
            problems.append("connection closed inside a multi-line answer")
        return problems


class SmtpChecker(_Paired):
    """SMTP: code lines of at most 512 octets, one code per reply, enhanced codes once
    ENHANCEDSTATUSCODES was announced, and a close only after 221 or 421."""

    protocol = "smtp"

    def __init__(self) -> None:
        super().__init__()
        self._lines: list[tuple[bytes, bytes, bytes]] = []  # the reply being read
        self._enhanced = False
        self._last_code = b""
        self._extra = 0

    def received(self, data: bytes) -> list[str]:
        lines, problems = self._feed(data)
        for i, raw in enumerate(lines):
            problem = _line_problem(raw)
            if problem is None and len(raw) + 1 > SMTP_MAX_REPLY_LINE:
                problem = f"reply line of {len(raw) + 1} octets"
            match = _SMTP_LINE.fullmatch(raw.removesuffix(b"\r"))
            if problem is None and match is None:
                problem = "not a reply code line"
            if problem is not None:
                problems.append(f"{problem}: {raw[:120]!r}")
            if match is None:
                continue
            code, sep, text = match.groups()
            if self._lines and self._lines[0][0] != code:
                problems.append(f"reply changes code mid-reply: {raw[:120]!r}")
            self._lines.append((code, sep, text))
            if sep == b" ":
                reply, self._lines = self._lines, []
                problem = self._reply(reply)
                if problem is not None:
                    problems.append(f"{problem}: {raw[:120]!r}")
                if self.tls:
                    return problems + self._after_go_ahead(lines, i)
        return problems

    def _reply(self, lines: list[tuple[bytes, bytes, bytes]]) -> str | None:
        self.replies += 1
        code = lines[0][0]
        self._last_code = code
        if not self._greeted:
            self._greeted = True
            return None if code == b"220" else "greeting is not 220"
        if not self.pending:
            self._extra += 1
            if self._extra == 1 and code == b"421":
                return None  # a timeout or a limit: said before the close
            return "reply with no command to answer"
        command = self.pending.pop(0)
        sasl, self._continuation = self._continuation, code == b"334"
        verb = b"" if sasl else command.split(b" ", 1)[0].rstrip(b"\r").upper()
        if verb in (b"EHLO", b"HELO"):
            if code == b"250":
                self._enhanced = verb == b"EHLO" and any(
                    t.upper() == b"ENHANCEDSTATUSCODES" for _, _, t in lines[1:])
            return None  # RFC 2034: no enhanced codes on the replies to HELO and EHLO
        if not sasl:
            self._go_ahead(command, code == b"220", b"STARTTLS")
        if self._enhanced and code[:1] in b"245":
            for _, _, text in lines:
                match = _ENHANCED.match(text)
                if match is None or match.group(1) != code[:1]:
                    return f"{code.decode()} without an enhanced status code"
        return None

    def closed(self) -> list[str]:
        problems = []
        if self._in.buf or self._lines:
            problems.append("connection closed mid-reply")
        if self._greeted and self._last_code not in (b"221", b"421") and not self.tls:
            problems.append(f"connection closed after a {self._last_code.decode()} "
                            "(only 221 and 421 may close)")
        return problems


Checker = ImapChecker | Pop3Checker | SmtpChecker


def make_checker(protocol: str) -> Checker:
    return {"imap": ImapChecker, "pop3": Pop3Checker, "smtp": SmtpChecker}[protocol]()
