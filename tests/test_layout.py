"""The house: ctrl's import graph (read with ast, imports inside functions included) has no cycle and every
arrow points down the layers the README's "Layout" section describes; plugin files stay small; a heavy import
only where it is used."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: installed package -> folder of the repository (pyproject's package-dir)
PACKAGES = {"ctrl.algorithms": ROOT / "algorithms", "ctrl.datamodules": ROOT / "datamodules", "ctrl": ROOT / "ctrl"}
#: layers, bottom first: a module imports from its own layer or those below
LAYERS = [
    [
        "ctrl",
        "ctrl.seeds",
        "ctrl.tuning",
        "ctrl.figures",
        "ctrl.errors",
        "ctrl.assets",
        "ctrl.dtypes",
        "ctrl.conditions",
        "ctrl.images",
        "ctrl.linear_gaussian",
        "ctrl.sampling",
    ],
    ["ctrl.prompts", "ctrl.policy", "ctrl.rewards", "ctrl.classifier", "ctrl.datamodules", "ctrl.pretrain"],
    ["ctrl.evaluation", "ctrl.inference_time", "ctrl.algorithms", "ctrl.registry", "ctrl.testing"],
    ["ctrl.module", "ctrl.callbacks"],
    ["ctrl.parser", "ctrl.commands"],
    ["ctrl.benchmark", "ctrl.cli", "ctrl.guidance"],
]


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if package == "ctrl" and parts[0] in ("algorithms", "datamodules"):
                continue
            name = ".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])
            found.setdefault(name, path)
    return found


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the ctrl modules it imports anywhere in its file (at the top or inside functions)."""
    modules, graph = _modules(), {}
    for name, path in modules.items():
        targets = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {_owner(a.name, modules) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets |= {_owner(f"{base}.{a.name}", modules) for a in node.names}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def _layer(name: str) -> int:
    best = None
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (level, prefix)
    assert best is not None, f"{name} is in no layer of tests/test_layout.py: place it"
    return best[0]


def test_the_checker_finds_a_cycle_through_an_import_inside_a_function():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "ctrl.commands" in graph["ctrl.benchmark"]  # the graph is read (an arrow that must be there)
    assert cycles(graph) == []


def test_imports_go_down():
    upward = [f"{a} -> {b}" for a, targets in import_graph().items() for b in targets if _layer(b) > _layer(a)]
    assert upward == []


@pytest.mark.parametrize("path", sorted((ROOT / "algorithms").glob("*.py")), ids=lambda p: p.name)
def test_plugin_files_are_small(path):
    assert len(path.read_text().splitlines()) <= 200


def test_functions_are_short():
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert long == []


def test_a_stable_diffusion_run_does_not_import_scikit_learn():
    """scikit-learn serves the digits data and judge only; a run on a pipeline imports every module it needs
    (module, policies, plugins, datamodules, the CLI) without it: about 23 MiB of peak RSS it never uses."""
    code = (
        "import sys, ctrl.commands, ctrl.module, ctrl.evaluation, ctrl.policy, ctrl.datamodules, ctrl.registry; "
        "ctrl.registry.load_plugins(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn')[:3])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
