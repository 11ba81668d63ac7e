"""SMTP reply mapping, enhanced status codes and the [smtp] settings."""

from __future__ import annotations

import pytest

from proxy.config import Account, Settings
from proxy.login import Refusal
from proxy.smtp.replies import (
    MICROSOFT_SMTP_AUTH_DISABLED,
    add_enhanced_codes,
    format_reply,
    refusal_reply,
)


def test_upstream_multiline_reply_is_passed_through() -> None:
    # aiosmtplib joins the lines of a multi-line reply with "\n", without the codes.
    text = "5.7.1 Username and Password not accepted. Learn more at\n5.7.1  https://x.test/y"
    assert format_reply(535, text) == (
        "535-5.7.1 Username and Password not accepted. Learn more at\r\n"
        "535 5.7.1  https://x.test/y")


def test_single_line_reply_keeps_its_enhanced_code() -> None:
    assert format_reply(250, "2.1.5 Ok") == "250 2.1.5 Ok"
    assert format_reply(550, "5.1.1 <x@y>: Recipient address rejected") == \
        "550 5.1.1 <x@y>: Recipient address rejected"


def test_missing_enhanced_code_is_added() -> None:
    assert format_reply(250, "Ok") == "250 2.0.0 Ok"
    assert format_reply(451, "later", "4.4.2") == "451 4.4.2 later"
    assert add_enhanced_codes("503 Error: send EHLO first") == "503 5.5.1 Error: send EHLO first"
    assert add_enhanced_codes("250 OK") == "250 2.0.0 OK"
    assert add_enhanced_codes("503 5.5.1 already") == "503 5.5.1 already"


@pytest.mark.parametrize("line", ["220 host ESMTP", "334 ", "334 VXNlcm5hbWU6",
                                  "354 End data with <CR><LF>.<CR><LF>"])
def test_greeting_and_continuations_get_no_code(line: str) -> None:
    assert add_enhanced_codes(line) == line


def test_long_text_is_wrapped_under_512_octets() -> None:
    reply = format_reply(535, "word " * 300, "5.7.8")
    lines = reply.split("\r\n")
    assert len(lines) > 1 and all(len(x) < 512 for x in lines)
    assert all(x.startswith("535-5.7.8 ") for x in lines[:-1])
    assert lines[-1].startswith("535 5.7.8 ")


@pytest.mark.parametrize(("kind", "start"), [
    ("credentials", "535 5.7.8 "),
    ("authorization", "535 5.7.8 "),
    ("rejected", "535 5.7.8 "),
    ("unavailable", "454 4.7.0 "),
])
def test_refusal_kinds(kind: str, start: str) -> None:
    reply = refusal_reply(Refusal(kind, "some reason;\nrun `mailproxy token import a@b`"))  # type: ignore[arg-type]
    assert reply.startswith(start) and "\r\n" not in reply
    assert "mailproxy token import a@b" in reply


def test_microsoft_smtp_auth_disabled_says_what_to_switch_on() -> None:
    refusal = Refusal("rejected", "smtp.office365.com:587 refused a freshly refreshed token "
                      "for a@contoso.com (535 5.7.139 Authentication unsuccessful, "
                      "SmtpClientAuthentication is disabled for the Tenant.)")
    reply = refusal_reply(refusal)
    assert reply.startswith("535-5.7.139 ") or reply.startswith("535 5.7.139 ")
    flat = " ".join(line[10:] for line in reply.split("\r\n"))
    assert "SmtpClientAuthentication is disabled" in flat
    assert "Set-CASMailbox" in flat and "Authenticated SMTP" in MICROSOFT_SMTP_AUTH_DISABLED


def test_smtp_settings_and_provider_recipient_caps() -> None:
    settings = Settings()
    assert settings.smtp.listen == "127.0.0.1:1587"
    assert settings.smtp.max_message_size == 0
    gmail = Account(address="a@gmail.com", provider="gmail", client_id="x")
    m365 = Account(address="a@contoso.com", provider="office365", client_id="x")
    custom = Account(address="a@example.test", provider="custom", client_id="x",
                     token_url="https://t.example/token", imap_server="imap.example:993",
                     smtp_server="smtp.example:587", scopes=[])
    assert gmail.smtp_max_recipients == 100 and m365.smtp_max_recipients == 500
    assert custom.smtp_max_recipients is None
    assert str(gmail.server("smtp")) == "smtp.gmail.com:465"
    assert gmail.server("smtp").tls == "implicit"  # type: ignore[union-attr]
    assert m365.server("smtp").tls == "starttls"  # type: ignore[union-attr]
    assert custom.server("smtp").tls == "starttls"  # type: ignore[union-attr]
