"""The package's shape: stages in data-flow order, no import cycles, one kind dispatch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import vllm_patches
from vllm_patches.series.manifest import Release
from vllm_patches.targets.apply import PLACES, place_for
from vllm_patches.targets.base import Place
from vllm_patches.targets.find import Target

PACKAGE = Path(vllm_patches.__file__).parent
# The stages a user's data passes through, in order: a stage imports only from earlier ones
# (and from the private helpers at the top level); the CLI sits above them all.
STAGES = ["sources", "series", "targets", "diagnosis", "upstream"]


def _modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
        for p in PACKAGE.rglob("*.py")
        if "compat" not in p.parts
    }


def _graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (lazy imports included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm_patches"):
                module = (node.module or "").removeprefix("vllm_patches").lstrip(".")
                named = {f"{module}.{a.name}".lstrip(".") for a in node.names}
                deps |= (named & set(modules)) or {module}
        graph[name] = deps - {name, ""}
    return graph


def _stage(module: str) -> int | None:
    top = module.split(".")[0]
    return STAGES.index(top) if top in STAGES else None


def test_no_import_cycles():
    graph = _graph()
    assert "targets.installed" in graph and "_record" in graph["targets.installed"]
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


def test_stages_import_only_earlier_stages():
    backwards = []
    for module, deps in _graph().items():
        stage = _stage(module)
        if module in ("__main__", "__init__"):
            continue
        if module.startswith("_") or module == "errors" or module.startswith("probes"):
            # The private helpers serve every stage and import none of them.
            backwards += [f"{module} -> {d}" for d in deps if _stage(d) is not None]
        elif stage is not None:
            backwards += [f"{module} -> {d}" for d in deps if (_stage(d) or 0) > stage]
    assert backwards == []


def test_the_layout_names_every_stage():
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert set(STAGES) <= packages
    assert (PACKAGE / "targets" / "installed.py").is_file()  # "apply to an installed vLLM"


def test_kind_is_dispatched_in_one_place():
    """``target.kind`` picks the implementation in targets/apply.py and nowhere else."""
    compared = []
    for name, path in _modules().items():
        if name.startswith("probes."):  # inspect.Parameter.kind, in the target interpreter
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(side, ast.Attribute) and side.attr == "kind"
                for side in [node.left, *node.comparators]
            ):
                compared.append(f"{name}:{node.lineno}")
    assert compared == []


@pytest.mark.parametrize("kind", ["git", "tree", "site"])
def test_every_kind_implements_the_whole_interface(kind, tmp_path):
    place = place_for(Target(kind, tmp_path, "0.21.0", tmp_path / "vllm-0.21.0.dist-info"))
    assert isinstance(place, Place) and type(place) is PLACES[kind]
    for operation in ("preflight_apply", "apply", "preflight_revert", "revert", "recover"):
        assert getattr(type(place), operation) is not getattr(Place, operation), operation
    assert not getattr(Place, "__abstractmethods__", set()) - {
        "preflight_apply",
        "apply",
        "preflight_revert",
        "revert",
        "recover",
    }


def test_an_installed_vllm_carries_no_test_files(tmp_path, manifest):
    release: Release = manifest.releases["0.21.0"]
    site = place_for(Target("site", tmp_path, "0.21.0", tmp_path / "x.dist-info"))
    tree = place_for(Target("tree", tmp_path, "0.21.0"))
    assert [g.path for g in site.groups(release)] == [
        g.path for g in release.groups if g.path.startswith("vllm/")
    ]
    assert tree.groups(release) == list(release.groups)
