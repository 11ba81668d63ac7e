"""The container image keeps up with the listeners the daemon has."""

from __future__ import annotations

import re
from pathlib import Path

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
