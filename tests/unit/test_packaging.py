"""The container image and the systemd unit keep up with the daemon."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from proxy.config import Settings

ROOT = Path(__file__).resolve().parents[2]
LISTENERS = ("imap", "pop3", "smtp")


def test_every_listener_is_reachable_from_outside_the_container() -> None:
    text = (ROOT / "Dockerfile").read_text()
    env = dict(re.findall(r"MAILPROXY_(\w+?)__LISTEN=([\d.:]+)", text))
    expose = re.search(r"^EXPOSE (.+)$", text, re.M)
    assert expose is not None
    exposed = set(expose.group(1).split())
    settings = Settings()
    for name in LISTENERS:
        assert hasattr(settings, name)
        host, port = env[name.upper()].rsplit(":", 1)
        # Inside a container 127.0.0.1 would be unreachable from the published port.
        assert host == "0.0.0.0" and port in exposed, name
        default_port = getattr(settings, name).listen.rsplit(":", 1)[1]
        assert port == default_port, name  # the documented port, inside and out
    tls = dict(re.findall(r"MAILPROXY_(\w+?)__TLS_LISTEN=([\d.:]+)", text))
    for name in LISTENERS:
        host, port = tls[name.upper()].rsplit(":", 1)
        assert host == "0.0.0.0" and port in exposed, name
        assert port == getattr(settings, name).tls_listen.rsplit(":", 1)[1], name


def test_systemd_unit_exposure_is_at_most_2() -> None:
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (CI is set: .ci/run installs systemd)")
        pytest.skip("systemd-analyze is not installed")
    unit = ROOT / "systemd" / "mailproxy.service"
    done = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for mailproxy.service: ([\d.]+)", done.stdout)
    assert match is not None, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.0, done.stdout


def test_systemd_unit_is_a_notify_service_that_reloads() -> None:
    text = (ROOT / "systemd" / "mailproxy.service").read_text()
    lines = set(text.splitlines())
    assert {"Type=notify", "ExecReload=/bin/kill -HUP $MAINPID"} <= lines
    assert re.search(r"^WatchdogSec=\d+s$", text, re.M)
    assert "IMAP proxy" not in text  # it serves three protocols
