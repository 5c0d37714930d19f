"""The package's module graph: no import cycles, and no library module imports a command."""

from __future__ import annotations

import ast
from pathlib import Path

import mixcls

ROOT = Path(mixcls.__file__).parent


def _module_graph() -> dict[str, set[str]]:
    """mixcls module -> the mixcls modules it imports at the top level (imports inside
    functions are the deliberate late ones: torch-free command start-up)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("mixcls", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        edges = graph.setdefault(name, set())
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mixcls"):
                edges.add(node.module)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("mixcls"))
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
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


def test_the_graph_is_read():
    graph = _module_graph()
    assert "mixcls.train" in graph and "mixcls.run_setup" in graph["mixcls.train"]


def test_no_import_cycles():
    assert _find_cycle(_module_graph()) is None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_library_modules_never_import_commands():
    graph = _module_graph()
    wrong = [(m, d) for m, deps in graph.items() for d in deps
             if ".commands" in d and not m.startswith(("mixcls.commands", "mixcls.cli"))]
    assert wrong == []
