"""The package's shape: no import cycle in proxy/, no module over 400 lines without a written
reason, a docstring on every module. Read from the source (AST), nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "proxy"
MAX_LINES = 400
LONG_MARK = "long:"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    """The absolute module named by a ``from ... import`` in module ``current``."""
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    # In a package's __init__ one dot is the package itself; in a module, its package.
    drop = node.level - 1 if is_package else node.level
    if drop > len(base) - 1:
        raise ValueError(f"{current}: relative import beyond the top-level package")
    base = base[: len(base) - drop]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its body (functions and
    ``if TYPE_CHECKING:`` blocks included); ``from . import x`` counts as importing module x."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(target: str) -> None:
        # The longest prefix that is one of our modules (``import proxy.a.b`` names proxy.a.b).
        parts = target.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in known:
                found.add(candidate)
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, name, is_package)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                add(submodule if submodule in known else target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (first module repeated at the end) for each strongly connected group of
    modules (Tarjan), in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(_cycle_in(graph, group) for group in groups)


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest cycle through the group's first module, staying inside the group."""
    start = min(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & group):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    raise AssertionError(f"no cycle in strongly connected group {sorted(group)}")


# -- the checks --------------------------------------------------------------------------------


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles in proxy/:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_long_module_without_a_reason() -> None:
    long = []
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and LONG_MARK not in docstring:
            long.append(f"{name}: {lines} lines")
    assert not long, (f"modules over {MAX_LINES} lines without '{LONG_MARK} <reason>' in their "
                      "docstring (split them, or say why not):\n" + "\n".join(long))


def test_every_module_has_a_docstring() -> None:
    missing = [name for name, path in modules().items()
               if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()]
    assert not missing, "modules without a docstring: " + ", ".join(missing)


def test_core_stays_sans_io() -> None:
    io = {"asyncio", "socket", "ssl", "selectors"}
    offenders = []
    for name, path in modules().items():
        if name == f"{PACKAGE}.core" or name.startswith(f"{PACKAGE}.core."):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level \
                    else []
                offenders += [f"{name}: {n}" for n in names if n.split(".")[0] in io]
    assert not offenders, "proxy/core must not do I/O: " + ", ".join(offenders)


# -- the checker checked, on made-up graphs and sources ---------------------------------------


def test_cycles_are_found_and_shown() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(("source", "module", "is_package", "expected"), [
    ("from . import events", "proxy.core.imap", False, {"proxy.core.events"}),
    ("from .events import Send", "proxy.core.imap", False, {"proxy.core.events"}),
    ("from .. import __version__", "proxy.core.imap", False, {"proxy"}),
    ("from ..login import Gate", "proxy.sessions.imap", False, {"proxy.login"}),
    ("from .imap import x", "proxy.core", True, {"proxy.core.imap"}),
    ("from . import imap", "proxy.core", True, {"proxy.core.imap"}),
    ("import proxy.core.events", "proxy.login", False, {"proxy.core.events"}),
    ("from proxy.core import imap, sasl", "proxy.login", False,
     {"proxy.core.imap", "proxy.core.sasl"}),
    ("def f():\n    from .sasl import decode_plain\n", "proxy.core.imap", False,
     {"proxy.core.sasl"}),
    ("import asyncio\nfrom typing import Any", "proxy.core.imap", False, set()),
])
def test_imports_are_resolved(tmp_path: Path, source: str, module: str, is_package: bool,
                              expected: set[str]) -> None:
    path = tmp_path / ("__init__.py" if is_package else "m.py")
    path.write_text(source)
    known = {"proxy", "proxy.core", "proxy.core.imap", "proxy.core.events", "proxy.core.sasl",
             "proxy.login", "proxy.sessions", "proxy.sessions.imap"}
    assert imports_of(module, path, known) == expected
