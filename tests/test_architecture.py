"""The import rule of docs/ARCHITECTURE.md, read from the source (imports inside functions included).

- `toolkit.core` imports nothing else of the project;
- `exporters` and `runtimes` import only `toolkit.core` (and themselves);
- nothing outside `toolkit.cli` imports `toolkit.cli`;
- the project's module graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("toolkit", "exporters", "runtimes")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports, anywhere in the file; `from pkg import name` counts pkg.name if a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(path, known) - {name} for name, path in modules.items()}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_is_read(graph: dict[str, set[str]]) -> None:
    """The reader finds the rooms and real edges (so the rules below cannot pass on an empty graph)."""
    assert {"toolkit.core.errors", "toolkit.cli.main", "exporters.base", "runtimes.runner"} <= set(graph)
    assert "toolkit.core.errors" in graph["exporters.base"]
    assert "toolkit.deploy.pipeline" in graph["toolkit.cli.deploy"]


def test_core_imports_nothing_else_of_the_project(graph: dict[str, set[str]]) -> None:
    bad = {
        module: sorted(t for t in targets if not in_package(t, "toolkit.core") and t != "toolkit")
        for module, targets in graph.items()
        if in_package(module, "toolkit.core")
    }
    assert {m: t for m, t in bad.items() if t} == {}


@pytest.mark.parametrize("package", ["exporters", "runtimes"])
def test_exporters_and_runtimes_import_only_core(graph: dict[str, set[str]], package: str) -> None:
    bad = {
        module: sorted(
            t
            for t in targets
            if not (in_package(t, "toolkit.core") or in_package(t, package) or t == "toolkit")
        )
        for module, targets in graph.items()
        if in_package(module, package)
    }
    assert {m: t for m, t in bad.items() if t} == {}


def test_nothing_imports_the_cli(graph: dict[str, set[str]]) -> None:
    importers = sorted(
        module
        for module, targets in graph.items()
        if not in_package(module, "toolkit.cli") and any(in_package(t, "toolkit.cli") for t in targets)
    )
    assert importers == []


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    """Depth-first search over module edges (a package's __init__ is a module like any other)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles: list[list[str]] = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
