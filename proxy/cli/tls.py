"""``mailproxy tls export-ca`` and ``mailproxy tls info`` (the text comes from proxy.tls.show)."""

from __future__ import annotations

import sys

from ..config import Settings
from ..tls.show import ShowError, export_ca, info
from .common import EXIT_OK, CliError


def tls(settings: Settings, action: str) -> int:
    try:
        sys.stdout.write(export_ca(settings) if action == "export-ca" else info(settings))
    except ShowError as exc:
        raise CliError(str(exc)) from None
    return EXIT_OK
