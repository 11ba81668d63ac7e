"""``mailproxy status`` shows the outbound queue per account (here from disk: no daemon)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.cli.status import render_status
from proxy.queue.spool import Spool


def test_status_from_disk_shows_the_queue(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n'
                    f'control_socket = "{tmp_path / "nobody.sock"}"\n'
                    '[[accounts]]\naddress = "Dev@Example.com"\nprovider = "gmail"\n'
                    'client_id = "x"\n')

    async def fill() -> None:
        spool = await Spool.open(tmp_path / "state" / "queue")
        try:
            for _ in range(2):
                reception = spool.receive("dev@example.com", "dev@example.com", ["r@x.org"])
                await reception.write(b"Subject: s\r\n\r\n")
                record = await reception.commit()
            record.last_error = "451 4.3.0 try later"
            record.attempts = 1
            await spool.index.update(record)
        finally:
            await spool.aclose()

    asyncio.run(fill())
    # No daemon runs: the report comes from disk and the exit status says so (3).
    assert main(["status", "--json", "--config", str(path)]) == 3
    report = json.loads(capsys.readouterr().out)
    queue = report["accounts"][0]["queue"]
    assert queue["queued"] == 2 and queue["last_error"] == "451 4.3.0 try later"
    assert queue["oldest_age"] >= 0
    text = render_status(report)
    assert "  queue: 2 message(s), oldest " in text
    assert "  queue last error: 451 4.3.0 try later" in text
