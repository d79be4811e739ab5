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
    assert "neuqi.model.architectures" in graph["neuqi.model.checkpoint"]


def test_no_import_circle() -> None:
    assert _cycles(_module_graph()) == []


def test_a_circle_is_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


# The layers of ARCHITECTURE.md, from the ground up: a module imports from its own layer or from
# a lower one, never from a higher one or a neighbour of the same height.
LAYERS: dict[str, int] = {
    "neuqi.util": 0,  # errors, crash-safe files, fault points, devices, progress
    "neuqi.quant": 1,  # the mathematics: pure tensor code
    "neuqi.data": 1,  # calibration text and windows
    "neuqi.model": 2,  # checkpoints, families, decoder layers
    "neuqi.formats": 3,  # the output folder, its loader, the exports
    "neuqi.stages": 4,  # the steps of a job
    "neuqi.pipeline": 5,  # runs a job
    "neuqi.evaluate": 5,  # neuqi eval
    "neuqi.cli": 6,
}
# The one upward arrow: the stages read and write the job store, the interface meant for them.
ALLOWED_UPWARD = {("neuqi.stages", "neuqi.pipeline.store")}


def _layer(module: str) -> str | None:
    for layer in LAYERS:
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def test_every_module_has_a_layer() -> None:
    assert [m for m in _module_graph() if m != "neuqi" and _layer(m) is None] == []


def test_arrows_point_down() -> None:
    wrong = []
    for module, targets in _module_graph().items():
        here = _layer(module)
        for target in targets:
            there = _layer(target)
            if here is None or there is None or here == there:
                continue
            if LAYERS[there] >= LAYERS[here] and (here, target) not in ALLOWED_UPWARD:
                wrong.append(f"{module} -> {target}")
    assert sorted(wrong) == []


def test_the_mathematics_is_pure() -> None:
    """quant/ is tensor code: it imports nothing of neuqi but the shared helpers (its errors)."""
    graph = _module_graph()
    impure = [
        f"{m} -> {t}"
        for m, targets in graph.items()
        if _layer(m) == "neuqi.quant"
        for t in targets
        if _layer(t) not in ("neuqi.quant", "neuqi.util")
    ]
    assert impure == []


def test_a_wrong_arrow_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    graph = {"neuqi.quant.solver": {"neuqi.pipeline.store"}, "neuqi.stages.solve": {"neuqi.pipeline.store"}}
    monkeypatch.setattr(f"{__name__}._module_graph", lambda: graph)
    with pytest.raises(AssertionError, match="neuqi.quant.solver -> neuqi.pipeline.store"):
        test_arrows_point_down()
