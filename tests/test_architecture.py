"""The package's shape: no import cycles between its modules (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import vllm_patches

PACKAGE = Path(vllm_patches.__file__).parent


def _graph() -> dict[str, set[str]]:
    modules = {
        ".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
        for p in PACKAGE.rglob("*.py")
        if "compat" not in p.parts
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm_patches"):
                module = (node.module or "").removeprefix("vllm_patches").lstrip(".")
                deps |= {module} if module else {a.name for a in node.names} & set(modules)
        graph[name] = deps - {name}
    return graph


def test_no_import_cycles():
    graph = _graph()
    assert "apply" in graph and "_record" in graph["apply"]
    state: dict[str, str] = {}
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
