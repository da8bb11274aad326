"""The package's import graph: no cycles among ``moba_cli`` modules (lazy imports inside functions count
too), the library never imports the CLI layer, and the op layer knows nothing of the layers above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "moba_cli"
CLI_LAYER = ("moba_cli.commands", "moba_cli.cli", "moba_cli.__main__")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a module or a name inside one) refers to."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of moba_cli it imports``, anywhere in its source."""
    known = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in known.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                dep = _resolve(t, known)
                if dep and dep != mod and not mod.startswith(dep + "."):  # a package's own __init__ is no cycle
                    deps.add(dep)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]], within: str) -> list[str] | None:
    """One import cycle among modules under ``within``, or None."""
    nodes = {m for m in graph if m.startswith(within)}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m] & nodes):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(nodes):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_op_layer_has_no_cycles():
    assert find_cycle(import_graph(), "moba_cli.ops") is None


def test_op_layer_imports_nothing_above_it():
    for mod, deps in import_graph().items():
        if mod.startswith("moba_cli.ops"):
            bad = {d for d in deps if not d.startswith(("moba_cli.ops", "moba_cli.errors"))}
            assert not bad, (mod, bad)


def test_library_never_imports_the_cli_layer():
    for mod, deps in import_graph().items():
        if not mod.startswith(CLI_LAYER) and mod != "moba_cli":
            assert not {d for d in deps if d.startswith(CLI_LAYER)}, mod


@pytest.mark.parametrize("layer", ["moba_cli.integrations", "moba_cli.bench", "moba_cli.evals", "moba_cli.train",
                                   "moba_cli.analysis", "moba_cli"])
def test_no_import_cycles(layer):
    cycle = find_cycle(import_graph(), layer)
    assert cycle is None, " -> ".join(cycle)


def test_the_graph_sees_a_cycle():
    # the walker itself: a made-up cycle is found, a chain is not
    graph = {"moba_cli.a": {"moba_cli.b"}, "moba_cli.b": {"moba_cli.c"}, "moba_cli.c": {"moba_cli.a"}}
    assert find_cycle(graph, "moba_cli") == ["moba_cli.a", "moba_cli.b", "moba_cli.c", "moba_cli.a"]
    graph["moba_cli.c"] = set()
    assert find_cycle(graph, "moba_cli") is None
    assert "moba_cli.ops.moba.plan" in import_graph()["moba_cli.ops.moba.api"]


def test_no_module_over_500_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
