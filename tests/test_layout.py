"""The layout holds: imports point one way (no cycles between modules, nor between packages;
kernels/ imports nothing of the project, model/ and data/ nothing above them), and the trainer's
functions stay short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "gpt2"
BOTTOM = {
    "gpt2.kernels": {"gpt2.kernels"},
    "gpt2.model": {"gpt2.model", "gpt2._lazy", "gpt2.kernels"},
    "gpt2.data": {"gpt2.data", "gpt2.errors", "gpt2.faults"},
}
MAX_TRAINER_FUNCTION_LINES = 70


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """The gpt2 modules ``path`` imports anywhere (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module != "gpt2":  # (`from gpt2 import faults` imports the module, not the package)
                found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m == "gpt2" or m.startswith("gpt2.")}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {mod: {m for m in project_imports(p) if m in files and m != mod} for mod, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules along it, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles() -> None:
    graph = {m: {d for d in deps if d != "gpt2"} for m, deps in import_graph().items()}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``graph`` with each module folded into its package (``gpt2.optim.prune.scores`` ->
    ``gpt2.optim``); a top-level module (``gpt2.config``) is its own node."""
    packages: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        here = ".".join(mod.split(".")[:2])
        there = {".".join(d.split(".")[:2]) for d in deps}
        packages.setdefault(here, set()).update(there - {here, "gpt2"})
    return packages


def test_package_graph_folds_modules() -> None:
    graph = {"gpt2.a.x": {"gpt2.b"}, "gpt2.a.y": {"gpt2.a.x"}, "gpt2.b": {"gpt2.a.y", "gpt2"}}
    assert package_graph(graph) == {"gpt2.a": {"gpt2.b"}, "gpt2.b": {"gpt2.a"}}


def test_no_package_cycles() -> None:
    """Modules may be acyclic while their packages import each other (config -> optim.prune.scores,
    optim.factory -> config); then neither package can be read, tested or moved without the other."""
    cycle = find_cycle(package_graph(import_graph()))
    assert cycle is None, "packages import each other: " + " -> ".join(cycle or [])


def test_model_and_data_import_nothing_from_above() -> None:
    for mod, deps in import_graph().items():
        for bottom, allowed in BOTTOM.items():
            if mod == bottom or mod.startswith(bottom + "."):
                above = sorted(d for d in deps if not any(d == a or d.startswith(a + ".") for a in allowed))
                assert not above, f"{mod} imports {above}"


def test_nothing_below_the_trainer_imports_it() -> None:
    for mod, deps in import_graph().items():
        below = (["kernels"], ["model"], ["data"], ["optim"], ["track"], ["config"], ["sample"], ["tasks"])
        if mod.split(".")[1:2] in below:
            assert not [d for d in deps if d.startswith("gpt2.trainer")], mod


def test_the_launcher_and_the_analysis_sit_on_top() -> None:
    """Runs know nothing of how they were launched or summarised; summaries nothing of launching."""
    for mod, deps in import_graph().items():
        if not mod.startswith(("gpt2.launch", "gpt2.train")) or mod.startswith("gpt2.trainer"):
            assert not [d for d in deps if d.startswith("gpt2.launch")], mod
        if mod.startswith("gpt2.analysis"):
            assert not [d for d in deps if d.startswith(("gpt2.trainer", "gpt2.launch"))], mod


def test_trainer_functions_fit_on_a_screen() -> None:
    long = []
    for path in (PACKAGE / "trainer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_TRAINER_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
