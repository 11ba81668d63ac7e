"""FileTokenStore: serialisation, private files, atomic writes, the lock, change detection."""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import threading
from pathlib import Path

import pytest

from proxy.tokens import store as store_mod
from proxy.tokens.store import FileTokenStore, TokenState, safe_name


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def full_state() -> TokenState:
    return TokenState(
        refresh_token="rt-secret",
        access_token="at-secret",
        expires_at=123.5,
        needs_authorization=None,
        last_refresh=100.0,
        last_error="boom",
    )


def test_round_trip_and_empty(tmp_path: Path) -> None:
    store = FileTokenStore(tmp_path)
    assert store.load("a@example.com") == TokenState()
    store.save("a@example.com", full_state())
    assert FileTokenStore(tmp_path).load("a@example.com") == full_state()


def test_unknown_keys_ignored_and_types_checked() -> None:
    state = TokenState.from_json(
        json.dumps({"refresh_token": "r", "expires_at": 5, "future_field": [1, 2], "format": 9})
    )
    assert state == TokenState(refresh_token="r", expires_at=5.0)
    with pytest.raises(ValueError):
        TokenState.from_json('{"expires_at": "soon"}')
    with pytest.raises(ValueError):
        TokenState.from_json('{"refresh_token": 5}')
    with pytest.raises(ValueError):
        TokenState.from_json("[1]")


def test_repr_hides_tokens() -> None:
    text = repr(full_state())
    assert "rt-secret" not in text and "at-secret" not in text


def test_corrupt_file_names_the_file(tmp_path: Path) -> None:
    store = FileTokenStore(tmp_path)
    store.save("a@example.com", TokenState())
    store.path("a@example.com").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape("a@example.com.json")):
        store.load("a@example.com")


def test_permissions_whatever_the_umask(tmp_path: Path) -> None:
    state_dir = tmp_path / "new" / "state"
    old = os.umask(0)  # the widest umask: modes must still come out private
    try:
        FileTokenStore(state_dir).save("a@example.com", full_state())
    finally:
        os.umask(old)
    assert mode(tmp_path / "new") == 0o700
    assert mode(state_dir) == 0o700
    assert mode(state_dir / "tokens") == 0o700
    assert mode(state_dir / "tokens" / "a@example.com.json") == 0o600
    assert mode(state_dir / "tokens" / "a@example.com.lock") == 0o600


def test_file_is_created_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mode is given to open() itself: no moment where the file is readable by others."""
    created: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path: object, flags: int, mode: int = 0o777, **kw: object) -> int:
        if flags & os.O_CREAT:
            created.append((str(path), mode))
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(store_mod.os, "open", spy)
    FileTokenStore(tmp_path).save("a@example.com", full_state())
    assert created and all(m == 0o600 for _, m in created)
    assert any(p.endswith(".tmp") for p, _ in created)


@pytest.mark.parametrize(
    "key", ["../x@y", "..", ".", "a/../../b", "x\x00y", "ü@例え.jp", "a" * 1000]
)
def test_file_names_stay_inside(tmp_path: Path, key: str) -> None:
    store = FileTokenStore(tmp_path)
    store.save(key, TokenState(refresh_token="r"))
    path = store.path(key)
    assert path.parent == tmp_path / "tokens"
    assert "/" not in path.name and len(path.name) < 255
    assert path.resolve().parent == (tmp_path / "tokens").resolve()
    assert store.load(key).refresh_token == "r"
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == sorted(
        [path.name, safe_name(key, ".lock")]
    )


def test_file_names_are_distinct() -> None:
    keys = ["a/b", "a%2Fb", "a%2fb", "A", "a", "..", ".", "%sha256-x"]
    assert len({safe_name(k, ".json") for k in keys}) == len(keys)
    with pytest.raises(ValueError):
        safe_name("", ".json")


@pytest.mark.parametrize("fail", ["fsync", "replace"])
def test_failed_write_leaves_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: str
) -> None:
    store = FileTokenStore(tmp_path)
    store.save("a@example.com", TokenState(refresh_token="old"))

    def boom(*args: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(store_mod.os, fail, boom)
    with pytest.raises(OSError, match="disk on fire"):
        store.save("a@example.com", TokenState(refresh_token="new"))
    monkeypatch.undo()
    assert FileTokenStore(tmp_path).load("a@example.com").refresh_token == "old"
    leftovers = [p.name for p in (tmp_path / "tokens").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_update_is_serialised_across_threads(tmp_path: Path) -> None:
    def bump(state: TokenState) -> TokenState:
        return TokenState(last_error=str(int(state.last_error or "0") + 1))

    def worker() -> None:
        store = FileTokenStore(tmp_path)  # its own object, like another process
        for _ in range(25):
            store.update("a@example.com", bump)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert FileTokenStore(tmp_path).load("a@example.com").last_error == "100"


def test_update_waits_for_the_lock(tmp_path: Path) -> None:
    store = FileTokenStore(tmp_path)
    store.save("a@example.com", TokenState(refresh_token="r1"))
    lock_path = tmp_path / "tokens" / safe_name("a@example.com", ".lock")
    with open(lock_path, "a") as held:  # another process in the middle of its update
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        done = threading.Event()

        def update() -> None:
            store.update("a@example.com", lambda s: TokenState(refresh_token="r2"))
            done.set()

        thread = threading.Thread(target=update)
        thread.start()
        assert not done.wait(0.2)
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    assert done.wait(5)
    thread.join()
    assert store.load("a@example.com").refresh_token == "r2"


def test_update_without_change_writes_nothing(tmp_path: Path) -> None:
    store = FileTokenStore(tmp_path)
    store.save("a@example.com", TokenState(refresh_token="r"))
    before = store.path("a@example.com").stat().st_ino
    assert store.update("a@example.com", lambda s: s).refresh_token == "r"
    assert store.path("a@example.com").stat().st_ino == before


def test_change_detection(tmp_path: Path) -> None:
    daemon, cli = FileTokenStore(tmp_path), FileTokenStore(tmp_path)
    key = "a@example.com"
    assert daemon.changed(key)  # never loaded
    daemon.load(key)
    assert not daemon.changed(key)  # no file, still no file
    cli.save(key, TokenState(refresh_token="imported"))
    assert daemon.changed(key)
    assert daemon.load(key).refresh_token == "imported"
    assert not daemon.changed(key)
    daemon.save(key, TokenState(refresh_token="mine"))
    assert not daemon.changed(key)  # its own write
    assert cli.changed(key)
    cli.update(key, lambda s: TokenState(refresh_token="again"))
    assert daemon.changed(key)
