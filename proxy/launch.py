"""The ``mailproxy`` command's entry point: ``run`` picks the daemon's memory allocator (which
may restart the process) before anything heavy is imported, then the command line runs."""

from __future__ import annotations

import sys

from .daemon.memory import restart_for_run


def main() -> int:
    restart_for_run(sys.argv[1:])
    from .cli import main as cli_main  # the configuration, pydantic: after the restart

    return cli_main()
