"""The vLLM x lmcache pairing table: per cell, each candidate's imports/builds and the choice,
unpatched and patched. One venv per vLLM release; each lmcache release is laid over it."""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from vllm_patches.apply import apply, status
from vllm_patches.doctor import Diagnosis, diagnose_layers
from vllm_patches.envs import default_lmcache, lmcache_layer, venv_dir, vllm_env
from vllm_patches.errors import PatchToolError
from vllm_patches.sources import final_releases, read_sdist_file
from vllm_patches.targets import installed_vllm

Cell = dict[str, object]
_LABELS = ("unpatched", "patched")
FIRST_LMCACHE = "0.3.9.post2"
"""The oldest lmcache release the table covers (the one vLLM 0.12.0 imports with)."""
BASE_LMCACHE = "0.5.3"
"""The oldest lmcache whose dependencies a row's venv gets: a layer brings lmcache alone,
so the venv must hold what every layered release imports (0.4.7 on imports numba, which
0.3.x does not install); the others then lack only GPU packages (nixl, cupy-cuda12x,
cuda-python) and grpcio-observability, which no connector module imports."""


def _base_lmcache(version: str) -> str:
    """The lmcache installed (with its dependencies) in vLLM ``version``'s row venv."""
    return max(default_lmcache(version), BASE_LMCACHE, key=Version)


def _requirements(lines: Iterable[str]) -> list[Requirement]:
    """The requirements in ``lines`` (a requirements file or Requires-Dist) that apply here."""
    found = []
    for line in lines:
        text = line.split(" #", 1)[0].strip()
        if not text or text.startswith(("#", "-")):
            continue
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            found.append(req)
    return found


@functools.cache
def _vllm_requirements(version: str) -> tuple[Requirement, ...]:
    """What vLLM ``version`` requires on every platform (its ``requirements/common.txt``)."""
    data = read_sdist_file(version, "requirements/common.txt") or b""
    return tuple(_requirements(data.decode().splitlines()))


def pin_conflicts(version: str, layer: Path) -> list[str]:
    """The dependencies that vLLM ``version`` and the lmcache in ``layer`` pin apart.

    A conflict is a package both require for which no final release on the index satisfies
    both: ``pip install vllm==V lmcache==L`` is then refused, and installing lmcache after
    vLLM moves that package out of vLLM's range.
    """
    dist = next(iter(metadata.distributions(path=[str(layer)])))
    mine = {canonicalize_name(r.name): r for r in _vllm_requirements(version)}
    found = []
    for req in _requirements(dist.requires or []):
        theirs = mine.get(canonicalize_name(req.name))
        if theirs is None:
            continue
        both = theirs.specifier & req.specifier
        if not any(both.contains(v) for v in _releases(req.name)):
            found.append(f"{req.name}: vLLM {theirs.specifier}, lmcache {req.specifier}")
    return found


@functools.cache
def _releases(project: str) -> list[str]:
    return final_releases(project, "0")


def shard_of(cells: list[tuple[str, str]], shard: str | None) -> list[tuple[str, str]]:
    """The cells of shard ``i/n`` (1-based), in contiguous blocks; all cells without one.

    Blocks keep each vLLM release's cells together, so a shard builds few vLLM venvs.
    """
    if not shard:
        return cells
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        index = count = 0
    if not 1 <= index <= count:
        msg = f"--shard {shard!r}: give i/n with 1 <= i <= n, like 2/4"
        raise PatchToolError(msg)
    size = -(-len(cells) // count)
    return cells[(index - 1) * size : index * size]


def _state(candidate: dict) -> str:
    state = "builds" if candidate["builds"] else ("imports" if candidate["imports"] else "fails")
    return state + (f": {candidate['error'][:160]}" if candidate["error"] else "")


def _summary(diagnosis: Diagnosis) -> Cell:
    data = diagnosis.data
    candidates = {c["module"].rsplit(".", 1)[-1]: _state(c) for c in data.get("candidates", [])}
    if "builtin" in data:
        candidates["builtin"] = _state(data["builtin"])
    return {
        "ok": diagnosis.ok,
        "chosen": data.get("chosen", ""),
        "error": data.get("import_error") or data.get("chosen_error", ""),
        "candidates": candidates,
        "module_path_route": data.get("module_path_route", {}),
    }


def run_matrix(
    vllm_versions: list[str],
    lmcache_versions: list[str],
    shard: str | None = None,
    progress: Callable[[str], None] = lambda _: None,
    *,
    discard_venvs: bool = False,
) -> dict:
    """Measure every (vLLM, lmcache) cell of the shard; a failing install is a cell, not a crash.

    :param discard_venvs: remove each vLLM venv this run built once its cells are measured
        (the cache otherwise keeps ~3.5 GB per vLLM release).
    :returns: ``cells`` by ``"vllm|lmcache"``; per vLLM release the ``setup_seconds`` (venv
        and lmcache layers) and the ``seconds`` its cells took.
    """
    cells = shard_of([(v, lm) for v in vllm_versions for lm in lmcache_versions], shard)
    result: dict = {"cells": {}, "seconds": {}, "setup_seconds": {}}
    for version in dict.fromkeys(v for v, _ in cells):
        mine = [lm for v, lm in cells if v == version]
        base = _base_lmcache(version)
        venv = venv_dir(version, base)
        built_here = not (venv / ".complete").is_file()
        start = time.monotonic()
        try:
            python = vllm_env(version, base)
            layers = {lm: lmcache_layer(python, lm) for lm in mine}
        except PatchToolError as exc:
            for lm in mine:
                result["cells"][f"{version}|{lm}"] = {"install_error": str(exc)[:300]}
            continue
        result["setup_seconds"][version] = round(time.monotonic() - start, 1)
        start = time.monotonic()
        site = installed_vllm(str(python))
        if status(site).overall == "patched":
            apply(site, revert=True)
        rows: dict[str, Cell] = {lm: {} for lm in mine}
        for label in _LABELS:
            if label == "patched":
                apply(site)
            progress(f"vLLM {version} x lmcache {', '.join(mine)} ({label})")
            try:
                found = diagnose_layers(python, [layers[lm] for lm in mine])
                for lm, diagnosis in zip(mine, found, strict=True):
                    rows[lm][label] = _summary(diagnosis)
            finally:
                if label == "patched":
                    apply(site, revert=True)
        for lm in mine:
            result["cells"][f"{version}|{lm}"] = {
                **rows[lm],
                "pin_conflicts": pin_conflicts(version, layers[lm]),
            }
        result["seconds"][version] = round(time.monotonic() - start, 1)
        if discard_venvs and built_here:
            shutil.rmtree(venv)
    return result


def merge(parts: list[dict]) -> dict:
    """One result from the shards' results (equal to the unsharded run's cells)."""
    merged: dict = {"cells": {}, "seconds": {}, "setup_seconds": {}}
    for part in parts:
        merged["cells"].update(part["cells"])
        for key in ("seconds", "setup_seconds"):
            for version, seconds in part.get(key, {}).items():
                merged[key][version] = round(merged[key].get(version, 0) + seconds, 1)
    merged["cells"] = dict(sorted(merged["cells"].items(), key=lambda kv: _key(kv[0])))
    return merged


def _key(cell: str) -> tuple[Version, Version]:
    version, lmcache = cell.split("|")
    return Version(version), Version(lmcache)


def _axes(result: dict) -> tuple[list[str], list[str]]:
    """The table's vLLM releases and lmcache releases, oldest first."""
    keys = [k.split("|") for k in result["cells"]]
    return (
        sorted({v for v, _ in keys}, key=Version),
        sorted({lm for _, lm in keys}, key=Version),
    )


def _connector(info: Cell) -> str:
    """The short name of the class a cell resolved to."""
    chosen = str(info["chosen"])
    if not chosen:
        return "vLLM's module does not import"
    if "Unavailable" in chosen:
        return "none builds"
    module = chosen.rsplit(".", 2)[-2]
    if module == "lmcache_mp_connector":
        return "builtin" if chosen.startswith("vllm.") else "lmcache main"
    return module.replace("lmcache_mp_connector_", "_")


def _cell_text(cell: Cell, label: str) -> str:
    if "install_error" in cell:
        return f"install failed: {cell['install_error'][:80]}"
    info = cell[label]
    return f"{'starts' if info['ok'] else 'FAILS'}: {_connector(info)}"


def starts_with(result: dict, version: str, label: str) -> str:
    """The lmcache releases with which vLLM ``version`` starts (``label``: unpatched or
    patched), as runs of consecutive releases by connector: ``0.4.4-0.5.0 (_0180), ...``;
    a run whose pins conflict with vLLM's names the packages."""
    runs: list[tuple[str, str, str]] = []  # (what, first, last)
    previous = ""
    for lm in _axes(result)[1]:
        cell = result["cells"].get(f"{version}|{lm}", {})
        what = _connector(cell[label]) if cell.get(label, {}).get("ok") else ""
        if what and cell.get("pin_conflicts"):
            names = sorted({c.split(":")[0] for c in cell["pin_conflicts"]})
            what += f"; pins conflict: {', '.join(names)}"
        if what and runs and what == runs[-1][0] and previous == runs[-1][2]:
            runs[-1] = (what, runs[-1][1], lm)
        elif what:
            runs.append((what, lm, lm))
        previous = lm
    text = [f"{a}\N{EN DASH}{b} ({what})" if a != b else f"{a} ({what})" for what, a, b in runs]
    return ", ".join(text) or "none"


def summary(result: dict) -> str:
    """Per vLLM release, the lmcache releases that start and through which connector."""
    lines = [
        "| vLLM | starts unpatched with lmcache | starts patched with lmcache |",
        "|---|---|---|",
    ]
    for version in _axes(result)[0]:
        unpatched, patched = (starts_with(result, version, label) for label in _LABELS)
        lines.append(f"| {version} | {unpatched} | {patched} |")
    return "\n".join(lines) + "\n"


def _route_text(cell: Cell, label: str) -> str:
    """What ``kv_connector_module_path`` gives: the module's own class (honoured) or not."""
    routes = cell[label]["module_path_route"]
    if not routes:
        return "-"
    honoured = all(got == f"{module}.LMCacheMPConnector" for module, got in routes.items())
    return "honoured" if honoured else "ignored"


def markdown(result: dict) -> str:
    """The table: rows vLLM, columns lmcache; each cell unpatched / patched."""
    versions, lmcaches = _axes(result)
    lines = [
        "| vLLM / lmcache | " + " | ".join(lmcaches) + " |",
        "|---|" + "---|" * len(lmcaches),
    ]
    for version in versions:
        cells = []
        for lm in lmcaches:
            cell = result["cells"].get(f"{version}|{lm}")
            if cell is None:
                cells.append("-")
            elif "install_error" in cell:
                cells.append(_cell_text(cell, ""))
            else:
                conflicts = "".join(f"<br>pins conflict: {c}" for c in cell["pin_conflicts"])
                cells.append(
                    f"unpatched {_cell_text(cell, 'unpatched')}<br>"
                    f"patched {_cell_text(cell, 'patched')}<br>"
                    f"module path: {_route_text(cell, 'unpatched')} → "
                    f"{_route_text(cell, 'patched')}{conflicts}"
                )
        lines.append(f"| {version} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> None:
    """``matrix.json`` and ``matrix.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    cells, seconds = len(result["cells"]), sum(result["seconds"].values())
    setup = sum(result.get("setup_seconds", {}).values())
    timing = (
        f"{cells} cells measured in {seconds:,.0f} s ({seconds / max(cells, 1):.1f} s a cell, "
        f"unpatched and patched), plus {setup:,.0f} s of venv and lmcache set-up.\n\n"
    )
    (out / "matrix.md").write_text(timing + summary(result) + "\n" + markdown(result))
