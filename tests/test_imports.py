"""The package's shape: no import cycles (counting imports inside functions) and no oversized module.

The graph is built from the source (AST), not by importing: every ``import``
and ``from ... import`` anywhere in a module (top level, functions, methods,
``if TYPE_CHECKING`` blocks), absolute or relative, and
``importlib.import_module("shardc.x")`` / ``__import__("shardc.x")`` with a
literal name.  ``from . import x`` counts as an import of the submodule ``x``
when there is one, else of the package's ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "shardc"
MAX_LINES = 550


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _targets(node: ast.AST, current: str, is_package: bool, mods: dict[str, Path]) -> set[str]:
    """The shardc modules an import node (or a dynamic-import call) loads."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.split(".")[0] == "shardc"}
    if isinstance(node, ast.Call):
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            target = node.args[0].value
            if isinstance(target, str) and target.split(".")[0] == "shardc":
                return {target}
        return set()
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = current.split(".") if is_package else current.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
        if module.split(".")[0] != "shardc":
            return set()
    return {f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names}


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}."""
    mods = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, name, path.name == "__init__.py", mods):
                if target in mods and target != name:
                    edges[target] = min(edges.get(target, node.lineno), node.lineno)  # type: ignore[attr-defined]
        graph[name] = edges
    return graph


def elementary_cycles(graph: dict[str, dict[str, int]], limit: int = 10_000) -> set[tuple[str, ...]]:
    """Every simple cycle, each as a tuple starting at its alphabetically first module."""
    found: set[tuple[str, ...]] = set()
    for start in sorted(graph):
        stack = [(start, (start,))]
        while stack and len(found) < limit:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    found.add(path)
                elif nxt > start and nxt not in path:
                    stack.append((nxt, path + (nxt,)))
    return found


def _describe(cycle: tuple[str, ...], graph: dict[str, dict[str, int]]) -> str:
    hops = []
    for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True):
        hops.append(f"{a} -> {b} ({_modules()[a].relative_to(REPO)}:{graph[a][b]})")
    return "; ".join(hops)


def test_graph_sees_relative_absolute_and_function_level_imports() -> None:
    """The walker finds imports in every form, including inside functions."""
    mods = {
        "shardc": Path("__init__.py"),
        "shardc.a": Path("a.py"),
        "shardc.b": Path("b.py"),
        "shardc.sub": Path("sub/__init__.py"),
        "shardc.sub.c": Path("sub/c.py"),
        "shardc.sub.d": Path("sub/d.py"),
        "shardc.e": Path("e.py"),
    }
    src = """
import shardc.a
from shardc import b
from .. import __version__
def f():
    from .d import thing
    from ..e import other
    import importlib
    importlib.import_module("shardc.b")
"""
    seen = set()
    for node in ast.walk(ast.parse(src)):
        seen |= _targets(node, "shardc.sub.c", False, mods)
    assert seen == {"shardc.a", "shardc.b", "shardc", "shardc.sub.d", "shardc.e"}
    seen = set()
    for node in ast.walk(ast.parse("from . import c\nfrom .. import a")):
        seen |= _targets(node, "shardc.sub", True, mods)
    assert seen == {"shardc.sub.c", "shardc.a"}
    cyc = elementary_cycles({"x": {"y": 1}, "y": {"z": 1, "x": 2}, "z": {"x": 1}})
    assert cyc == {("x", "y"), ("x", "y", "z")}


def test_no_import_cycles() -> None:
    """No import cycle in shardc (imports inside functions included)."""
    graph = import_graph()
    new = sorted(elementary_cycles(graph), key=len)
    assert not new, "import cycle(s) in shardc:\n" + "\n".join(_describe(c, graph) for c in new)


def test_no_big_modules() -> None:
    """No module in shardc/ is over MAX_LINES lines."""
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    big = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them): " + ", ".join(
        f"{name} ({n} lines)" for name, n in sorted(big.items())
    )
