"""What a reload sees as changed: the diff of two Settings."""

from __future__ import annotations

from pathlib import Path

from proxy.config import Account, ImapListener, MetricsSettings, NotifySettings, Settings
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
