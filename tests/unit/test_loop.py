"""The daemon's choice of event loop, and that the tests run on the loop they claim."""

from __future__ import annotations

import asyncio

import pytest

from proxy import loop


def test_default_is_uvloop_when_installed() -> None:
    expected = "uvloop" if loop.uvloop_available() else "asyncio"
    assert loop.chosen({}) == expected
    assert loop.chosen({loop.ENV: ""}) == expected


def test_explicit_choice() -> None:
    assert loop.chosen({loop.ENV: "asyncio"}) == "asyncio"
    assert loop.chosen({loop.ENV: " AsyncIO "}) == "asyncio"
    with pytest.raises(loop.LoopChoiceError, match="use one of uvloop, asyncio"):
        loop.chosen({loop.ENV: "trio"})


def test_uvloop_asked_for_but_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "uvloop_available", lambda: False)
    with pytest.raises(loop.LoopChoiceError, match="uvloop is not installed"):
        loop.chosen({loop.ENV: "uvloop"})
    assert loop.chosen({}) == "asyncio"


def test_factories_make_the_named_loop() -> None:
    made = loop.factory("asyncio")()
    try:
        assert type(made).__module__.startswith("asyncio")
    finally:
        made.close()
    if loop.uvloop_available():
        made = loop.factory("uvloop")()
        try:
            assert type(made).__module__ == "uvloop"
        finally:
            made.close()


async def test_this_suite_runs_on_the_chosen_loop() -> None:
    running = type(asyncio.get_running_loop()).__module__
    assert running.split(".")[0] == loop.chosen()
