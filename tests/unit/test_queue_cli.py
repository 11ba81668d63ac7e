"""``mailproxy queue ...`` through the real command line (in process)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.queue.spool import Spool


def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    return path


async def fill(directory: Path) -> list[str]:
    spool = await Spool.open(directory)
    ids = []
    try:
        for n in range(2):
            reception = spool.receive("a@example.com", "dev@example.com", [f"r{n}@example.net"])
            await reception.write(f"Subject: {n}\r\n\r\nbody\r\n".encode())
            ids.append((await reception.commit()).id)
    finally:
        await spool.aclose()
    return ids


def test_queue_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = config(tmp_path)
    assert main(["queue", "list", "--json", "--config", str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == []
    a, b = asyncio.run(fill(tmp_path / "state" / "queue"))
    assert main(["queue", "list", "--json", "--config", str(path)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["id"] for m in listed] == [a, b] and listed[1]["recipients"] == ["r1@example.net"]
    assert main(["queue", "list", "--config", str(path)]) == 0
    assert "2 message(s)" in capsys.readouterr().out
    assert main(["queue", "show", a, "--config", str(path)]) == 0
    assert "Subject: 0" in capsys.readouterr().out
    assert main(["queue", "retry", "--all", "--config", str(path)]) == 0
    assert "message(s) due now" in capsys.readouterr().out
    assert main(["queue", "retry", b, "--config", str(path)]) == 0
    assert main(["queue", "delete", b, "--config", str(path)]) == 0
    assert "deleted" in capsys.readouterr().out
    assert main(["queue", "delete", b, "--config", str(path)]) == 1
    assert f"no message '{b}' in the queue" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["queue", "retry", "--config", str(path)])  # an ID or --all
