"""Inputs for the fuzzer: pre-login commands from each protocol's grammar and from typical client
sessions, and mutations of them (split at random points, oversized, non-UTF-8, NUL and control
bytes, bare CR or LF, interleaved IMAP literals).

Everything comes from one ``random.Random``, so a seed gives the same inputs again.

Some inputs are STARTTLS (STLS) with commands pipelined behind it: after the go-ahead the
daemon must drop those unread and take what follows (more commands, the fuzzer's probe) as a
failed TLS handshake, and close; the checkers allow nothing in the clear after the go-ahead.
A real handshake and the upgraded session are tested in tests/integration/test_local_tls*.py.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable

USER = "fuzz@example.test"
# The account's local password: a login with it runs to the token step. Its characters need
# quoting or a literal in IMAP and end a POP3 line only at CRLF.
PASSWORD = 'fuzz pw "q" \\ ]{3}(é)%* x'
UNKNOWN = "nobody@example.test"
_USER_FORMS = (USER, USER.upper(), "Fuzz@Example.TEST")

# Line lengths around the limits the daemon and the RFCs set (content length, before CRLF).
_EDGES = (253, 254, 255, 256, 510, 511, 512, 513, 998, 999, 1000, 1001, 1002, 1024, 1100,
          8190, 8191, 8192, 8193, 16384, 33000)
_NASTY = (b"\x00", b"\xff", b"\xfe", b"\xc3", b"\x80", b"\x1b[31m", b"\x1b]0;t\x07", b"\r",
          b"\n", b"\r\n", b"\t", b"\x7f", b"]", b"[", b"{", b"}", b'"', b"\\", b"(", b")",
          b"*", b"%", b"+", b" ", b"  ", b"\xe2\x80\xae", b"\xed\xa0\x80", b"\xf4\x90\x80\x80")

# Client sessions as typical clients open them (Thunderbird, Outlook, mutt, K-9, Apple Mail,
# imaptest, Postfix and msmtp as SMTP clients), before login. Written down from their
# documented behaviour; user name and password are placeholders replaced at use.
_SESSIONS: dict[str, list[bytes]] = {
    "imap": [
        b"1 capability\r\n2 ID (\"name\" \"Thunderbird\" \"version\" \"115.6.0\")\r\n"
        b"3 authenticate PLAIN\r\n{PLAIN}\r\n",
        b"a0000 CAPABILITY\r\na0001 LOGIN {QUSER} {QPASS}\r\n",
        b"A001 CAPABILITY\r\nA002 AUTHENTICATE PLAIN {PLAIN}\r\n",
        b"1 ID (\"name\" \"com.fsck.k9\" \"version\" \"6.7\")\r\n2 LOGIN {USER} {QPASS}\r\n",
        b"1.1 CAPABILITY\r\n1.2 ID (\"name\" \"iPhone Mail\" \"os\" \"iOS\")\r\n"
        b"2.1 LOGIN {{{ULEN}}}\r\n{USER} {{{PLEN}}}\r\n{PASS}\r\n",
        b"1 LOGIN {{{ULEN}+}}\r\n{USER} {{{PLEN}+}}\r\n{PASS}\r\n",
        b"x STARTTLS now\r\ny NOOP\r\nz LOGOUT\r\n",
        b"1 ID (\"name\" \"imaptest\" \"x-a\" \"{BIG}\" \"x-b\" \"{BIG}\")\r\n",
    ],
    "pop3": [
        b"CAPA\r\nUSER {USER}\r\nPASS {PASS}\r\n",
        b"CAPA\r\nAUTH PLAIN\r\n{PLAIN}\r\n",
        b"AUTH\r\nAUTH PLAIN {PLAIN}\r\n",
        b"XSTLS\r\nCAPA\r\nQUIT\r\n",
        b"USER {USER}\r\nPASS {PASS}\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 1\r\n",
        b"APOP {USER} c4c9334bac560ecc979e58001b3e22fb\r\n",
    ],
    "smtp": [
        b"EHLO [127.0.0.1]\r\nAUTH PLAIN {PLAIN}\r\n",
        b"EHLO client.example\r\nAUTH LOGIN\r\n{B64USER}\r\n{B64PASS}\r\n",
        b"EHLO localhost\r\nSTARTTLS x\r\nEHLO localhost\r\n",
        b"HELO relay.example\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n"
        b"DATA\r\n",
        b"EHLO x\r\nMAIL FROM:<a@example.test> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=x\r\n"
        b"RCPT TO:<b@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.test\r\n",
        b"EHLO x\r\nAUTH PLAIN\r\n{PLAIN}\r\nRSET\r\nNOOP\r\n",
        b"EHLO x\r\nVRFY postmaster\r\nHELP\r\nRSET\r\n",
    ],
}


def _quoted(text: str) -> bytes:
    """An IMAP quoted string."""
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _plain(user: str, password: str, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


class Inputs:
    """Generated and mutated inputs for one protocol. ``next()`` gives one input as the list
    of segments to write (separate writes: a command split at random points)."""

    def __init__(self, protocol: str, rng: random.Random, *, check_rate: float = 0.002,
                 credentials_mutated: float = 0.1, big_rate: float = 0.01,
                 starttls_rate: float = 0.002) -> None:
        self.protocol = protocol
        self.rng = rng
        self.starttls_rate = starttls_rate  # ends the connection when the daemon says go
        self.check_rate = check_rate
        self.credentials_mutated = credentials_mutated
        self._credentials_used = False
        self.big_rate = big_rate
        self._grammar: Callable[[], bytes] = {
            "imap": self._imap, "pop3": self._pop3, "smtp": self._smtp}[protocol]

    # -- shared pieces ---------------------------------------------------------------------

    def _credentials(self) -> tuple[str, str]:
        """Mostly the account's own, its name in any case (a password the daemon verified
        once costs no check again: the login runs on to the token step); at ``check_rate``
        one that costs the daemon a password check (a scrypt, ~0.1 s of a core, one at a time
        per client address): an unknown user or a wrong password. Mutated inputs make more
        of those (a flipped bit in a password)."""
        rng = self.rng
        self._credentials_used = True
        if rng.random() < self.check_rate:
            r = rng.random()
            if r < 0.3:
                return USER, "wrong-" + self._word(True)
            if r < 0.6:
                return UNKNOWN, PASSWORD
            return self._word(True), self._word(True)
        return rng.choice(_USER_FORMS), PASSWORD

    def _word(self, odd: bool = False) -> str:
        rng = self.rng
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_@"
        if odd:
            alphabet += "]![#$&'^`|~=?/\"\\(){}%*+é\u00ff"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 24)))

    def _session(self) -> bytes:
        rng = self.rng
        user, password = self._credentials()
        text = rng.choice(_SESSIONS[self.protocol])
        big = "x" * rng.choice((10, 100, 1024)) if rng.random() < self.big_rate else "y"
        fields = {
            b"{USER}": user.encode(), b"{PASS}": password.encode(),
            b"{ULEN}": str(len(user.encode())).encode(),
            b"{PLEN}": str(len(password.encode())).encode(),
            b"{PLAIN}": _plain(user, password), b"{BIG}": big.encode(),
            b"{B64USER}": base64.b64encode(user.encode()),
            b"{B64PASS}": base64.b64encode(password.encode()),
            b"{QUSER}": _quoted(user), b"{QPASS}": _quoted(password),
        }
        for key, value in fields.items():
            text = text.replace(key, value)
        return text.replace(b"{{", b"{").replace(b"}}", b"}")

    # -- grammars --------------------------------------------------------------------------

    def _imap_tag(self) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.85:
            return rng.choice((b"a", b"A", b"t", b"1.", b"x")) + str(rng.randrange(10000)).encode()
        return rng.choice((b"a]1", b"]", b"\xff", b"\xc3\xa9", b"+a", b"*", b"", b"a{1}",
                           b"a\x00", b"a%", b"a(", b"t" * rng.choice((100, 600)), b"~!#$&'"))

    def _imap_string(self, text: str) -> bytes:
        rng = self.rng
        data = text.encode("utf-8")
        r = rng.random()
        if r < 0.35 and all(c.isalnum() or c in ".-_@]!#$&'" for c in text):
            return data  # atom (or ASTRING with "]")
        if r < 0.7:
            return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        plus = b"+" if rng.random() < 0.5 else b""
        size = len(data) + (rng.choice((-1, 1, 100)) if rng.random() < 0.05 else 0)
        return b"{%d%s}\r\n%s" % (max(size, 0), plus, data)

    def _imap(self) -> bytes:
        rng = self.rng
        tag = self._imap_tag()
        r = rng.random()
        if r < 0.12:
            return tag + b" CAPABILITY\r\n"
        if r < 0.22:
            return tag + rng.choice((b" NOOP", b" noop", b" NoOp", b" NOOP extra")) + b"\r\n"
        if r < 0.35:
            pairs = rng.randrange(0, 31 if rng.random() < self.big_rate else 4)
            size = 1024 if pairs > 3 else 12
            body = b" ".join(self._imap_string(f"k{i}") + b" " +
                             self._imap_string("v" * rng.randrange(1, size)) for i in range(pairs))
            return tag + b" ID " + (b"(" + body + b")" if pairs or rng.random() < 0.5
                                    else b"NIL") + b"\r\n"
        if r < 0.5:
            user, password = self._credentials()
            return (tag + b" LOGIN " + self._imap_string(user) + b" " +
                    self._imap_string(password) + b"\r\n")
        if r < 0.62:
            user, password = self._credentials()
            authzid = rng.choice(("", "", "", user, "other@example.test"))
            blob = _plain(user, password, authzid)
            mech = rng.choice((b"PLAIN", b"plain", b"PLAIN", b"LOGIN", b"XOAUTH2",
                               b"CRAM-MD5", b"\x00\x1b[31m", b"PL\xffAIN"))
            if rng.random() < 0.5:
                return tag + b" AUTHENTICATE " + mech + b" " + blob + b"\r\n"
            response = rng.choice((blob, b"*", b"=", b"!!", blob + b"x"))
            return tag + b" AUTHENTICATE " + mech + b"\r\n" + response + b"\r\n"
        if r < 0.66:
            return tag + rng.choice((b" STARTTLS x", b" LOGOUT" if rng.random() < 0.1 else
                                     b" STARTTLS now")) + b"\r\n"
        if r < 0.8:
            verb = rng.choice((b"SELECT INBOX", b"FETCH 1:* (FLAGS)", b"LIST \"\" *",
                               b"ENABLE UTF8=ACCEPT", b"COMPRESS DEFLATE", b"IDLE",
                               b"UID FETCH 1 BODY[]", b"APPEND INBOX {3}\r\nabc", b"XYZZY",
                               b"NAMESPACE", b"UNSELECT", b"" ))
            return tag + b" " + verb + b"\r\n"
        if r < 0.9:
            return self._session()
        return tag + b" " + self._word(True).encode() + b" " + self._word(True).encode() + b"\r\n"

    def _pop3(self) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.12:
            return rng.choice((b"CAPA", b"capa", b"CAPA x")) + b"\r\n"
        if r < 0.3:
            user, password = self._credentials()
            return b"USER " + user.encode() + b"\r\nPASS " + password.encode() + b"\r\n"
        if r < 0.36:
            return rng.choice((b"USER ", b"PASS ")) + self._word(True).encode() + b"\r\n"
        if r < 0.5:
            user, password = self._credentials()
            blob = _plain(user, password, rng.choice(("", "", user, "other@example.test")))
            mech = rng.choice((b"PLAIN", b"plain", b"PLAIN", b"LOGIN", b"XOAUTH2",
                               b"\x00\x1b[31mred", b"PL\xffAIN", b"X" * 200))
            if rng.random() < 0.5:
                return b"AUTH " + mech + b" " + blob + b"\r\n"
            response = rng.choice((blob, b"*", b"=", b"!!", b"A" * 1100))
            return b"AUTH " + mech + b"\r\n" + response + b"\r\n"
        if r < 0.55:
            return b"AUTH\r\n"
        if r < 0.72:
            return rng.choice((b"XSTLS", b"APOP a b", b"STAT", b"LIST", b"RETR 1", b"TOP 1 0",
                               b"NOOP", b"RSET", b"UIDL", b"XTND", b"QUIT" if rng.random() < 0.1
                               else b"NOOP", b"", b"USER")) + b"\r\n"
        if r < 0.85:
            return self._session()
        return self._word(True).encode() + b" " + self._word(True).encode() + b"\r\n"

    def _smtp_path(self) -> bytes:
        rng = self.rng
        return rng.choice((b"<a@example.test>", b"<>", b"<\"q s\"@example.test>",
                           b"<@relay:a@example.test>", b"<a@[127.0.0.1]>", b"a@example.test",
                           "<ü@example.test>".encode(), b"<a@example.test"))

    def _smtp(self) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.15:
            return rng.choice((b"EHLO ", b"HELO ", b"ehlo ", b"EHLO")) + \
                rng.choice((b"client.example", b"[127.0.0.1]", b"x", b"")) + b"\r\n"
        if r < 0.3:
            user, password = self._credentials()
            authzid = rng.choice(("", "", "", user, "other@example.test"))
            blob = _plain(user, password, authzid)
            if rng.random() < 0.4:
                return b"AUTH PLAIN " + blob + b"\r\n"
            if rng.random() < 0.5:
                response = rng.choice((blob, b"*", b"=", b"!!", b"A" * rng.choice((1000, 1100))))
                return b"AUTH PLAIN\r\n" + response + b"\r\n"
            return (b"AUTH LOGIN\r\n" + base64.b64encode(user.encode()) + b"\r\n" +
                    base64.b64encode(password.encode()) + b"\r\n")
        if r < 0.45:
            return (b"MAIL FROM:" + self._smtp_path() +
                    rng.choice((b"", b" SIZE=10", b" BODY=8BITMIME", b" SMTPUTF8", b" RET=FULL",
                                b" ENVID=x", b" AUTH=<>", b" SIZE=99999999999")) + b"\r\n")
        if r < 0.55:
            return (b"RCPT TO:" + self._smtp_path() +
                    rng.choice((b"", b" NOTIFY=NEVER", b" ORCPT=rfc822;b@example.test")) +
                    b"\r\n")
        if r < 0.72:
            return rng.choice((b"DATA", b"RSET", b"NOOP", b"NOOP x", b"VRFY a", b"EXPN list",
                               b"HELP", b"HELP DATA", b"STARTTLS x", b"BDAT 10 LAST",
                               b"QUIT" if rng.random() < 0.1 else b"NOOP", b"AUTH",
                               b"AUTH CRAM-MD5", b"AUTH XOAUTH2 x")) + b"\r\n"
        if r < 0.85:
            return self._session()
        if r < 0.9:
            return rng.choice((b"XYZZY", b"\x1b[31mRED", b"BOGUS\x00", b"MAIL\xff")) + b"\r\n"
        return rng.choice((b"MAIL ", b"RCPT ", b"EHLO ", b"HELO ", b"VRFY ")) + \
            self._word(True).encode() + b"\r\n"

    # -- mutations -------------------------------------------------------------------------

    def _mutate(self, data: bytes) -> bytes:
        rng = self.rng
        out = bytearray(data)
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            op = rng.randrange(9)
            pos = rng.randrange(len(out) + 1)
            if op == 0:
                out[pos:pos] = rng.choice(_NASTY)
            elif op == 1 and out:
                del out[pos:pos + rng.randrange(1, 8)]
            elif op == 2 and out:
                i = rng.randrange(len(out))
                out[i] ^= 1 << rng.randrange(8)
            elif op == 3 and out:
                end = min(len(out), pos + rng.randrange(1, 16))
                out[pos:pos] = out[pos:end] * rng.randrange(1, 4)
            elif op == 4:
                out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
            elif op == 5:
                # A bare LF or lone CR for a CRLF, or the other way round.
                text = bytes(out)
                out = bytearray(text.replace(b"\r\n", rng.choice((b"\n", b"\r", b"\r\r\n")))
                                if rng.random() < 0.7 else text.replace(b"\n", b"\r\n"))
            elif op == 6 and self.protocol == "imap":
                # An interleaved literal, of the right size or not, synchronizing or not.
                chunk = bytes(rng.randrange(32, 127) for _ in range(rng.randrange(0, 12)))
                size = len(chunk) + (rng.choice((-1, 1, 5)) if rng.random() < 0.1 else 0)
                plus = b"+" if rng.random() < 0.5 else b""
                out[pos:pos] = b" {%d%s}\r\n" % (max(size, 0), plus) + chunk
            elif op == 7:
                out = bytearray(bytes(out).swapcase())
            elif op == 8 and rng.random() < self.big_rate * 10:
                out = bytearray(self._oversize(bytes(out)))
        if not out.endswith(b"\n") and rng.random() < 0.9:
            out += b"\r\n"  # most inputs end their line: the probe after them stays a command
        return bytes(out)

    def _oversize(self, data: bytes) -> bytes:
        rng = self.rng
        line = data.split(b"\n", 1)[0].removesuffix(b"\r") or b"X"
        target = rng.choice(_EDGES)
        filler = rng.choice((b"A", b"a ", b"\xff", b"\x00", line[-1:]))
        return (line + filler * target)[:target] + b"\r\n"

    def _split(self, data: bytes) -> list[bytes]:
        rng = self.rng
        if len(data) < 2 or rng.random() < 0.6:
            return [data]
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(1, 4))))
        return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]

    def _starttls(self) -> bytes:
        """STARTTLS (STLS), maybe after EHLO, and commands pipelined behind it."""
        rng = self.rng
        user, password = self._credentials()
        plain = _plain(user, password)
        if self.protocol == "imap":
            tag = self._imap_tag()
            behind = rng.choice((b"", b"b LOGIN " + _quoted(user) + b" " + _quoted(password),
                                 b"b AUTHENTICATE PLAIN " + plain, b"b NOOP", b"b CAPABILITY"))
            return tag + b" STARTTLS\r\n" + (behind + b"\r\n" if behind else b"")
        if self.protocol == "pop3":
            behind = rng.choice((b"", b"USER " + user.encode() + b"\r\nPASS " +
                                 password.encode(), b"AUTH PLAIN " + plain, b"CAPA", b"NOOP"))
            return b"STLS\r\n" + (behind + b"\r\n" if behind else b"")
        behind = rng.choice((b"", b"AUTH PLAIN " + plain, b"MAIL FROM:<a@example.test>",
                             b"EHLO again", b"NOOP"))
        return (rng.choice((b"EHLO x\r\n", b"")) + b"STARTTLS\r\n" +
                (behind + b"\r\n" if behind else b""))

    def next(self) -> tuple[str, list[bytes]]:
        """(where it came from, the segments to write)"""
        rng = self.rng
        if rng.random() < self.starttls_rate:
            return "starttls", self._split(self._starttls())
        r = rng.random()
        if r < self.big_rate:
            return "oversized", self._split(self._oversize(self._grammar()))
        self._credentials_used = False
        data = self._grammar()
        # A mutated login is mostly a wrong password or an unknown user, which costs the
        # daemon a password check (see _credentials): those are mutated less often.
        if r < 0.45 or (self._credentials_used and rng.random() >= self.credentials_mutated):
            return "grammar", self._split(data)
        return "mutated", self._split(self._mutate(data))
