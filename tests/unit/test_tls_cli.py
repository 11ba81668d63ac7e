"""``mailproxy tls export-ca`` and ``mailproxy tls info`` through the command line."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.tls.certs import ensure_local_certificates, local_files, wanted_names


def config(tmp_path: Path) -> str:
    path = tmp_path / "config.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n[tls]\nnames = ["nas.lan"]\n')
    return str(path)


def test_tls_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path)
    assert main(["tls", "export-ca", "--config", cfg]) == 1
    assert "mailproxy creates its certificate at its first start" in capsys.readouterr().err
    ensure_local_certificates(tmp_path / "state", wanted_names(["nas.lan"]),
                              dt.datetime.now(dt.UTC))
    assert main(["tls", "export-ca", "--config", cfg]) == 0
    assert capsys.readouterr().out == local_files(tmp_path / "state").ca_cert.read_text()
    assert main(["tls", "info", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "nas.lan" in out and "SHA-256:" in out and "local CA" in out
    with pytest.raises(SystemExit) as info:
        main(["tls", "--help"])
    assert info.value.code == 0 and "export-ca" in capsys.readouterr().out
