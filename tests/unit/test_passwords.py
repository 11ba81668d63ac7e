"""PasswordBook: scrypt once per account and process, a cache that follows the file."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.passwords import PasswordBook, check_password

KEY = "alice@example.com"


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts hashlib.scrypt calls, noting the thread each ran in."""
    calls: list[str] = []
    real: Callable[..., bytes] = hashlib.scrypt

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    return calls


def test_hash_file_format_and_modes(tmp_path: Path) -> None:
    book = PasswordBook(tmp_path / "state")
    assert not book.has(KEY)
    book.set(KEY, "hunter2")
    assert book.has(KEY)
    path = book.path(KEY)
    text = path.read_text().strip()
    scheme, n, r, p, _salt, _digest = text.split("$")
    assert (scheme, n, r, p) == ("scrypt", "32768", "8", "1")
    assert "hunter2" not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    # Salted: the same password hashes differently each time.
    book.set("bob@example.com", "hunter2")
    assert book.path("bob@example.com").read_text() != path.read_text()


async def test_right_and_wrong(tmp_path: Path) -> None:
    book = PasswordBook(tmp_path)
    book.set(KEY, "correct horse")
    assert await book.verify(KEY, "correct horse")
    assert not await book.verify(KEY, "correct hors")
    assert not await book.verify(KEY, "")
    assert not await book.verify("nobody@example.com", "correct horse")


async def test_non_ascii_and_undecodable(tmp_path: Path) -> None:
    book = PasswordBook(tmp_path)
    odd = "pässwörd\udcff"  # a client byte that was not UTF-8, kept by surrogateescape
    book.set(KEY, odd)
    assert await book.verify(KEY, odd)
    assert not await book.verify(KEY, "pässwörd")


async def test_second_right_login_skips_scrypt(tmp_path: Path, scrypt_calls: list[str]) -> None:
    book = PasswordBook(tmp_path)
    book.set(KEY, "pw")
    scrypt_calls.clear()
    assert await book.verify(KEY, "pw")
    assert len(scrypt_calls) == 1
    assert scrypt_calls[0] != threading.main_thread().name  # off the event loop
    for _ in range(10):
        assert await book.verify(KEY, "pw")
    assert len(scrypt_calls) == 1


async def test_wrong_password_is_never_cached(tmp_path: Path, scrypt_calls: list[str]) -> None:
    book = PasswordBook(tmp_path)
    book.set(KEY, "pw")
    scrypt_calls.clear()
    assert not await book.verify(KEY, "guess")
    assert not await book.verify(KEY, "guess")
    assert len(scrypt_calls) == 2
    assert await book.verify(KEY, "pw")
    assert not await book.verify(KEY, "guess")  # a good password cached changes nothing
    assert len(scrypt_calls) == 4


async def test_cache_follows_the_file(tmp_path: Path, scrypt_calls: list[str]) -> None:
    daemon = PasswordBook(tmp_path)
    PasswordBook(tmp_path).set(KEY, "old")
    assert await daemon.verify(KEY, "old")
    PasswordBook(tmp_path).set(KEY, "new")  # `mailproxy password set` from the CLI
    scrypt_calls.clear()
    assert not await daemon.verify(KEY, "old")
    assert await daemon.verify(KEY, "new")
    assert len(scrypt_calls) == 2
    daemon.path(KEY).unlink()
    assert not await daemon.verify(KEY, "new")


async def test_concurrent_first_logins_pay_once(tmp_path: Path, scrypt_calls: list[str]) -> None:
    book = PasswordBook(tmp_path)
    book.set(KEY, "pw")
    scrypt_calls.clear()
    results = await asyncio.gather(*(book.verify(KEY, "pw") for _ in range(20)))
    assert all(results)
    assert len(scrypt_calls) == 1


async def test_unusable_hash_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    book = PasswordBook(tmp_path)
    book.set(KEY, "Sekr1t-PW")
    for junk in [
        "plaintext-pw",
        "scrypt$1073741824$8$1$AAAA$AAAA",
        "scrypt$x$8$1$AA$AA",
        "scrypt$16384$8$1$!!$AAAA",
        "\xff\xfe",
    ]:
        book.path(KEY).write_bytes(junk.encode("latin-1"))
        with caplog.at_level(logging.ERROR, logger="mailproxy.passwords"):
            assert not await book.verify(KEY, "Sekr1t-PW")
    assert "unusable password hash" in caplog.text
    assert "Sekr1t-PW" not in caplog.text


def test_check_password_rejects_foreign_format() -> None:
    with pytest.raises(ValueError):
        check_password("$2b$12$abcdefghijklmnopqrstuv", b"x")
