"""Log lines: the session context on text and JSON lines, the masked pre-login dialogue, the
status reasons worded for a person."""

from __future__ import annotations

import base64
import contextvars
import io
import json
import logging

import pytest

from proxy import logs
from proxy.cli.status import explain
from proxy.sessions.dialogue import masked

PLAIN = base64.b64encode(b"\0u\0hunter2")


def _emit(fmt: logs.LogFormat, *, in_session: bool) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.ContextFilter())
    handler.setFormatter(logs.JsonFormatter() if fmt == "json"
                         else logging.Formatter(logs.TEXT_FORMAT))
    log = logging.getLogger("test.logs")
    log.addHandler(handler)
    log.propagate = False
    try:
        def run() -> None:
            if in_session:
                logs.begin_session("imap", ("::1", 5555, 0, 0))
                logs.account.set("a@example.test")
            log.warning("hello %s", "there")
        contextvars.copy_context().run(run)
    finally:
        log.removeHandler(handler)
    return stream.getvalue()


def test_text_lines_carry_the_session_context() -> None:
    line = _emit("text", in_session=True)
    assert "WARNING test.logs: [imap [::1]:5555 s=" in line and line.endswith("] hello there\n")
    assert "WARNING test.logs: hello there" in _emit("text", in_session=False)


def test_json_lines() -> None:
    record = json.loads(_emit("json", in_session=True))
    assert record["level"] == "warning" and record["logger"] == "test.logs"
    assert record["message"] == "hello there" and record["time"].endswith("Z")
    assert record["protocol"] == "imap" and record["peer"] == "[::1]:5555"
    assert record["account"] == "a@example.test" and len(record["session"]) == 8
    assert set(json.loads(_emit("json", in_session=False))) == {"time", "level", "logger",
                                                                 "message"}


@pytest.mark.parametrize(("proto", "data", "secret"), [
    ("imap", b"a1 LOGIN user hunter2\r\n", "hunter2"),
    ("imap", b'a1 login "user" "hunter 2"\r\n', "hunter"),
    ("imap", b"a2 AUTHENTICATE PLAIN " + PLAIN + b"\r\n", PLAIN.decode()),
    ("imap", PLAIN + b"\r\n", PLAIN.decode()),
    ("imap", b"a3 LOGIN user {7}\r\n", "{7}"),
    ("imap", b"hunter2\r\n", "hunter2"),
    ("imap", b"er hunter2\r\n", "hunter2"),
    ("pop3", b"PASS hunter2\r\n", "hunter2"),
    ("pop3", b"pass hunter2\r\n", "hunter2"),
    ("pop3", b"AUTH PLAIN " + PLAIN + b"\r\n", PLAIN.decode()),
    ("pop3", b"APOP user 0123456789abcdef\r\n", "0123456789abcdef"),
])
def test_dialogue_never_shows_a_credential(proto: str, data: bytes, secret: str) -> None:
    shown = masked(proto, data)
    assert secret not in shown and "hidden" in shown, shown


def test_dialogue_shows_what_is_harmless() -> None:
    assert masked("imap", b"a1 CAPABILITY\r\n") == "a1 CAPABILITY"
    assert masked("imap", b"a1 LOGIN u p\r\n").startswith("a1 LOGIN [")
    assert masked("pop3", b"USER bob\r\nPASS x\r\n") == "USER bob | PASS [1 bytes hidden]"


def test_status_reasons_say_what_to_run() -> None:
    assert explain("invalid_grant (Token has been expired or revoked.)", "a@b.c") == (
        "refresh token revoked or expired (invalid_grant (Token has been expired or revoked.)):"
        " run `mailproxy authorize a@b.c`")
    assert explain(None, "a@b.c") == "not authorized yet: run `mailproxy authorize a@b.c`"
