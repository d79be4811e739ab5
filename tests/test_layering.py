"""The import structure of ``src/neuqi`` (ARCHITECTURE.md): no import circle between modules, and
the arrows between layers point one way.

Every ``import`` counts, also one inside a function or under ``TYPE_CHECKING``: a lazy import
hides a circle from the interpreter, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "neuqi"


def _module_graph() -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from neuqi.pipeline import tasks" imports the module neuqi.pipeline.tasks
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_packages() -> None:
    graph = _module_graph()
    assert "neuqi.pipeline.store" in graph["neuqi.stages.solve"]
    assert "neuqi.architectures" in graph["neuqi.checkpoint"]


def test_no_import_circle() -> None:
    assert _cycles(_module_graph()) == []


def test_a_circle_is_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


# What each layer may import from the layers above it (everything else points down).
ALLOWED_UPWARD = {
    # the stages read and write the job store, the one pipeline interface meant for them
    "neuqi.stages": {"neuqi.pipeline.store"},
    # pure computation: no pipeline, no stages, no command line
    "neuqi.solver": set(),
    "neuqi.solver_numba": set(),
    "neuqi.solver_triton": set(),
    "neuqi.gptq": set(),
    "neuqi.packing": set(),
    "neuqi.architectures": set(),
    "neuqi.durable": set(),
}
UPPER = ("neuqi.pipeline", "neuqi.stages", "neuqi.cli", "neuqi.export")


@pytest.mark.parametrize("layer", sorted(ALLOWED_UPWARD))
def test_arrows_point_down(layer: str) -> None:
    graph = _module_graph()
    wrong = []
    for module, targets in graph.items():
        if module != layer and not module.startswith(layer + "."):
            continue
        for target in targets:
            upward = any(target == u or target.startswith(u + ".") for u in UPPER)
            inside = target == layer or target.startswith(layer + ".")
            if upward and not inside and target not in ALLOWED_UPWARD[layer]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []
