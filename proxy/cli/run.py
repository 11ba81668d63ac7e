"""``mailproxy run``: the daemon in the foreground."""

from __future__ import annotations

import asyncio
import logging

from ..config import Settings
from ..daemon.control import ControlError
from ..daemon.server import serve
from ..tls.contexts import TlsSetupError
from ..tokens.keys import MasterKeyError
from .common import EXIT_OK, CliError


def run(settings: Settings, defaults: bool) -> int:
    """``defaults``: no configuration file was found."""
    log = logging.getLogger("mailproxy")
    if defaults:
        log.warning("no configuration file found; running with built-in defaults "
                    "(see config.example.toml)")
    if not settings.accounts:
        log.warning("no accounts configured: every login will be refused")
    try:
        asyncio.run(serve(settings))
    except (MasterKeyError, ControlError, TlsSetupError) as exc:
        raise CliError(f"cannot start: {exc}") from None
    except OSError as exc:
        raise CliError(f"cannot start: {exc}") from None
    return EXIT_OK
