"""The house's floors: no import of the library runs back up. Every import of ``latentsync`` (at the top, inside a
function, or only for the type checker) goes from a module to one below it, so the modules form no cycle, and the
ground floor (what every stage is steered by) and the models' maths import nothing above them."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "latentsync"
# Modules every other floor may use, which use no module of ours but each other.
GROUND = {"latentsync.errors", "latentsync.control", "latentsync.options"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that ``path`` imports anywhere (``from a.b import c`` names ``a.b``, and ``a.b.c`` when
    that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found.update(name for name in names if name in modules)
    return found - {"latentsync"}  # the package's own __init__ only re-exports, lazily


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_runs_back_up_the_house():
    cycle = _cycle(_graph())
    assert cycle is None, "these imports run in a circle: " + " → ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_ground_floor_imports_only_the_ground_floor():
    graph = _graph()
    assert {name: graph[name] - GROUND for name in GROUND if graph[name] - GROUND} == {}


def test_the_models_maths_import_no_loader_and_no_run():
    """``latentsync.models`` are layers and their maths: checkpoints are read by ``weights``, runs by the stages."""
    graph = _graph()
    above = {name: {m for m in deps if not m.startswith("latentsync.models") and m not in GROUND
                    and m not in {"latentsync.devices", "latentsync.audio", "latentsync.config"}}
             for name, deps in graph.items() if name.startswith("latentsync.models")}
    assert {name: deps for name, deps in above.items() if deps} == {}
