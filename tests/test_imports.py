"""No import circles in gradleak: the graph of ``from gradleak... import`` statements between
its modules, at module level and inside functions (``TYPE_CHECKING`` blocks included), has
no cycle. An import from a module's own parent package (``from . import x`` inside the
package that imports it) is not an edge: the package's ``__init__`` is not a dependency of
its parts."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "gradleak"


def _modules() -> dict[str, tuple[Path, bool]]:
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if package else parts)] = (path, package)
    return modules


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported gradleak module: line of the first import}."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, (path, package) in modules.items():
        edges = graph.setdefault(name, {})
        here = name.split(".") if package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base_parts = here[:len(here) - node.level + 1] if node.level else []
                base = ".".join(base_parts + ([node.module] if node.module else [])) if node.level else node.module
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                if target in modules and target != name and not name.startswith(target + "."):
                    edges.setdefault(target, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle():
    graph = {"a": {"b": 1}, "b": {"c": 3}, "c": {"a": 7}, "d": {"a": 2}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "gradleak.update" in graph["gradleak.update_file"]          # module level
    assert "gradleak.audit._group" in graph["gradleak.audit._pool"]    # inside the worker function


def test_no_import_circles():
    graph = import_graph()
    found = cycles(graph)
    described = ["; ".join(f"{a} -> {b} (line {graph[a][b]})" for a in component for b in component
                           if b in graph[a]) for component in found]
    assert not found, "import circles:\n" + "\n".join(described)
