"""Which asyncio event loop the daemon runs on.

uvloop (libuv) when it is installed, as it is by default on Linux and macOS: in
``bench/smtp_bench.py`` it took the proxy's CPU per relayed message down by about a fifth and
brought the sequential 10 KB case from ~0.73 to ~0.81 of a direct connection. The standard
loop otherwise. ``MAILPROXY_EVENT_LOOP=asyncio`` (or ``uvloop``) chooses explicitly; the test
suite runs the relay tests on both.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

ENV = "MAILPROXY_EVENT_LOOP"
CHOICES = ("uvloop", "asyncio")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class LoopChoiceError(ValueError):
    """The event loop asked for in ``MAILPROXY_EVENT_LOOP`` cannot be had."""


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def chosen(environ: dict[str, str] | None = None) -> str:
    """The name of the loop to run: the environment's choice, else uvloop if installed."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    if not value:
        return "uvloop" if uvloop_available() else "asyncio"
    if value not in CHOICES:
        raise LoopChoiceError(f"{ENV}={value!r}: use one of {', '.join(CHOICES)}")
    if value == "uvloop" and not uvloop_available():
        raise LoopChoiceError(f"{ENV}=uvloop, but uvloop is not installed "
                              "(pip install uvloop, or unset the variable)")
    return value


def factory(name: str) -> LoopFactory:
    """A function that makes a new event loop of the kind ``name``."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def describe(name: str) -> str:
    if name == "uvloop":
        from importlib.metadata import version

        return f"uvloop {version('uvloop')}"
    return "asyncio (standard library)"
