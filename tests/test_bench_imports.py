"""The bench and analysis libraries: no import cycles among moba_cli modules, and no use of the CLI layer.

Imports are read from the source (module level and inside functions alike), so a lazy import that would
close a cycle or reach into ``moba_cli.commands`` is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "moba_cli"
MINE = ("moba_cli.bench", "moba_cli.analysis", "moba_cli.utils")
CLI_LAYER = ("moba_cli.commands", "moba_cli.cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """moba_cli modules that ``name`` imports; ``from pkg import sub`` counts as the submodule ``pkg.sub``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _mine(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in MINE)


def test_library_does_not_import_the_cli_layer():
    graph = _graph()
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if _mine(m)
                 for d in deps if any(d == c or d.startswith(c + ".") for c in CLI_LAYER))
    assert not bad, bad


def test_no_import_cycle_through_bench_or_analysis():
    graph = _graph()
    cycles = []
    for start in sorted(m for m in graph if _mine(m)):
        # Depth-first search for a path back to start.
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    cycles.append(" -> ".join(trail + [start]))
                elif dep not in seen:
                    seen.add(dep)
                    stack.append((dep, trail + [dep]))
    assert not cycles, cycles


@pytest.mark.parametrize("line", ["from moba_cli.commands._common import parse_dtype", "from .providers import X"])
def test_the_walker_sees_lazy_and_relative_imports(tmp_path, line):
    """The checks above would pass vacuously if the walker missed an import inside a function."""
    known = {"moba_cli.commands._common": ROOT / "x", "moba_cli.bench.providers": ROOT / "y"}
    src = tmp_path / "presets.py"
    src.write_text(f"def build():\n    {line}\n")
    found = _imports("moba_cli.bench.presets", src, known)
    assert found and found <= set(known)


def test_bench_and_analysis_files_stay_small_and_names_are_unique():
    files = [p for pkg in ("bench", "analysis") for p in (ROOT / pkg).glob("*.py")]
    assert files
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
    # `moba compare` has a command module; the library behind it must not reuse the name.
    assert not (ROOT / "analysis" / "compare.py").exists()
