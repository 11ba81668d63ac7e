"""Make ``tests.support`` importable however pytest is started (``pytest`` or ``python -m``)."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from collections.abc import Mapping  # noqa: E402

import pytest  # noqa: E402

from proxy import loop  # noqa: E402

# The tests that relay sessions through the daemon's own loop (in this process) run on both
# event loops when uvloop is installed: the daemon's default, and the standard one it falls
# back to. Everything else runs on the loop the daemon would choose (MAILPROXY_EVENT_LOOP).
BOTH_LOOPS = {"test_smtp_proxy.py", "test_imap_proxy.py", "test_pop3_proxy.py",
              "test_smtp_data.py", "test_smtp_upstream.py"}


def pytest_asyncio_loop_factories(config: pytest.Config,
                                  item: pytest.Item) -> Mapping[str, loop.LoopFactory]:
    name = loop.chosen()
    names = [name]
    if item.path.name in BOTH_LOOPS and loop.uvloop_available():
        names = list(loop.CHOICES)
    return {n: loop.factory(n) for n in names}
