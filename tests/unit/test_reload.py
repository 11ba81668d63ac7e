"""What a reload sees as changed: the diff of two Settings (listeners plain and TLS, TLS
settings, accounts, sections, restart keys)."""

from __future__ import annotations

from pathlib import Path

from proxy.config import (
    Account,
    ImapListener,
    MetricsSettings,
    NotifySettings,
    Pop3Listener,
    Settings,
    SmtpListener,
    TlsSettings,
)
from proxy.daemon.reload import diff


def _account(address: str, **extra: object) -> Account:
    return Account(address=address, provider="gmail", client_id="id", **extra)  # type: ignore[arg-type]


def _settings(*accounts: Account, **extra: object) -> Settings:
    extra.setdefault("state_dir", Path("/tmp/state"))
    return Settings(accounts=list(accounts), **extra)  # type: ignore[arg-type]


def test_unchanged() -> None:
    a = _account("a@example.com")
    changes = diff(_settings(a), _settings(_account("A@example.com".lower())))
    assert changes.describe() == ["no changes"] and not changes.restart


def test_accounts_added_removed_changed() -> None:
    old = _settings(_account("a@example.com"), _account("b@example.com"))
    new = _settings(_account("b@example.com", smtp_max_recipients=5),
                    _account("c@example.com"))
    changes = diff(old, new)
    assert [a.address for a in changes.added] == ["c@example.com"]
    assert [a.address for a in changes.removed] == ["a@example.com"]
    assert [a.address for a in changes.changed] == ["b@example.com"]


def test_listeners_limits_sections_and_restart_keys() -> None:
    old = _settings()
    new = _settings(imap=ImapListener(listen="127.0.0.1:2143", max_line=1024),
                    notify=NotifySettings(failure_threshold=5),
                    metrics=MetricsSettings(listen="127.0.0.1:9464"), shutdown_grace=3,
                    state_dir=Path("/tmp/elsewhere"))
    changes = diff(old, new)
    assert changes.listeners == {"imap": ("127.0.0.1:1143", "127.0.0.1:2143")}
    assert set(changes.sections) == {"imap", "notify", "metrics", "shutdown_grace"}
    assert changes.restart == ["state_dir"]
    assert "imap listener moved from 127.0.0.1:1143 to 127.0.0.1:2143" in changes.describe()


def test_tls_listeners_and_tls_settings() -> None:
    old = _settings()
    new = _settings(imap=ImapListener(tls_listen="127.0.0.1:2993", require_tls=True),
                    pop3=Pop3Listener(tls_listen=""),
                    smtp=SmtpListener(tls_listen="127.0.0.1:1465", tls_min_version="1.3"))
    changes = diff(old, new)
    # A TLS listener moved, one closed; an unchanged one is left alone.
    assert changes.listeners == {"imaps": ("127.0.0.1:1993", "127.0.0.1:2993"),
                                 "pop3s": ("127.0.0.1:1995", "")}
    assert set(changes.describe()) == {
        "imaps listener moved from 127.0.0.1:1993 to 127.0.0.1:2993",
        "pop3s listener on 127.0.0.1:1995 closed", "[imap] changed", "[smtp] changed"}
    assert changes.new_tls  # no context for TLS 1.3 as the oldest version yet
    assert set(changes.sections) == {"imap", "smtp"}
    # Opened again; back to a version already served: the running contexts do.
    back = diff(new, old)
    assert back.listeners["pop3s"] == ("", "127.0.0.1:1995")
    assert "pop3s listener opened on 127.0.0.1:1995" in back.describe()
    assert not back.new_tls
    # [tls] changed (a certificate, names): new contexts, applied without a restart.
    names = diff(old, _settings(tls=TlsSettings(names=["mail.lan"])))
    assert names.new_tls and names.sections == ["tls"] and not names.restart
