"""``mailproxy run``: the daemon in the foreground."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ..config import Settings
from ..daemon.control import ControlError
from ..daemon.memory import allocator_in_use, forget_allocator_variable, freeze_startup_objects
from ..daemon.server import serve
from ..daemon.startup import EXIT_CONFIG, StartupError
from ..tls.contexts import TlsSetupError
from ..tokens.keys import MasterKeyError
from .common import EXIT_OK, CliError


def run(settings: Settings, path: Path | None) -> int:
    """``path``: the configuration file read, None when none was found (built-in defaults)."""
    defaults = path is None
    log = logging.getLogger("mailproxy")
    log.info("memory allocator: %s", allocator_in_use())
    forget_allocator_variable()
    if defaults:
        log.warning("no configuration file found; running with built-in defaults "
                    "(see config.example.toml)")
    if not settings.accounts:
        log.warning("no accounts configured: every login will be refused")
    freeze_startup_objects()
    try:
        asyncio.run(serve(settings, path))
    except StartupError as exc:
        raise CliError(f"cannot start: {exc}", exc.code) from None
    except (MasterKeyError, ControlError, TlsSetupError) as exc:
        raise CliError(f"cannot start: {exc}", EXIT_CONFIG) from None
    except OSError as exc:
        raise CliError(f"cannot start: {exc}") from None
    return EXIT_OK
