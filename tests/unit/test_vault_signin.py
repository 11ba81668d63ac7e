"""The per-account sign-in lock shared by `mailproxy authorize` and the admin page."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from proxy.vault import signin

KEY = "alice@example.com"


def test_one_holder_at_a_time_and_who_it_is(tmp_path: Path) -> None:
    first = signin.take(tmp_path, KEY, "admin")
    path = signin.lock_path(tmp_path, KEY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == f"{os.getpid()} admin\n"
    with pytest.raises(signin.SignInBusy) as busy:
        signin.take(tmp_path, KEY, "authorize")  # another file description: refused too
    assert busy.value.holder == signin.Holder(os.getpid(), "admin")
    assert busy.value.holder.this_process
    signin.take(tmp_path, "bob@example.com", "admin").release()  # other accounts are free
    first.release()
    first.release()  # twice is harmless
    with signin.held(tmp_path, KEY, "authorize"):
        assert path.read_text() == f"{os.getpid()} authorize\n"
    signin.take(tmp_path, KEY, "admin").release()


def test_another_process_holding_it_is_named(tmp_path: Path) -> None:
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: hold the lock until told to stop
        try:
            signin.take(tmp_path, KEY, "authorize")
            os.write(ready_w, b"x")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        with pytest.raises(signin.SignInBusy) as busy:
            signin.take(tmp_path, KEY, "admin")
        assert busy.value.holder == signin.Holder(pid, "authorize")
        assert not busy.value.holder.this_process
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)
    signin.take(tmp_path, KEY, "admin").release()  # gone with its process


def test_an_older_holder_wrote_only_its_pid(tmp_path: Path) -> None:
    lock = signin.take(tmp_path, KEY, "admin")
    signin.lock_path(tmp_path, KEY).write_text("4242\n")
    with pytest.raises(signin.SignInBusy) as busy:
        signin.take(tmp_path, KEY, "authorize")
    assert busy.value.holder == signin.Holder(4242, None)
    lock.release()
