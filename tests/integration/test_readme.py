"""The README's first command, exactly as written, on a fresh copy of the project with Debian's
own python3 (which refuses a system-wide pip install): it installs and starts the daemon."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import _require
from tests.support.clirun import ROOT
from tests.support.dovecot import free_port

DEBIAN_PYTHON = Path("/usr/bin/python3")


def readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [block.strip() for block in blocks]


def test_readme_has_two_commands_first() -> None:
    first, second = readme_commands()[:2]
    assert "mailproxy run" in first and "config.example.toml" in first
    assert "pytest" in second


def test_readme_first_command_installs_and_runs(tmp_path: Path) -> None:
    _require(DEBIAN_PYTHON.exists(), "Debian's /usr/bin/python3 is not installed")
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "config.example.toml"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "proxy", project / "proxy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # "python3" is Debian's, as on a fresh machine (this one may have another first on PATH).
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(DEBIAN_PYTHON)
    ports = {proto: free_port() for proto in ("IMAP", "POP3", "SMTP")}
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}",
           "MAILPROXY_STATE_DIR": str(tmp_path / "state"),
           **{f"MAILPROXY_{p}__LISTEN": f"127.0.0.1:{port}" for p, port in ports.items()},
           **{f"MAILPROXY_{p}__TLS_LISTEN": f"127.0.0.1:{free_port()}" for p in ports},
           "MAILPROXY_ADMIN__LISTEN": f"127.0.0.1:{free_port()}"}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.Popen(["bash", "-c", readme_commands()[0]], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 480
        while True:
            try:
                with socket.create_connection(("127.0.0.1", ports["IMAP"]), timeout=5) as s:
                    assert s.recv(100).startswith(b"* OK")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.communicate(timeout=30)[0] if proc.poll() is not None else ""
                    pytest.fail(f"the first command did not start the daemon:\n{out[-3000:]}")
                time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as the README says
        out = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
