"""The vLLM x lmcache pairing table: per cell, each candidate's imports/builds and the choice,
unpatched and patched. One venv per vLLM release; each lmcache release is laid over it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from vllm_patches.apply import apply, status
from vllm_patches.doctor import Diagnosis, diagnose
from vllm_patches.envs import default_lmcache, lmcache_layer, vllm_env
from vllm_patches.errors import PatchToolError
from vllm_patches.targets import installed_vllm

Cell = dict[str, object]


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
) -> dict:
    """Measure every (vLLM, lmcache) cell of the shard; a failing install is a cell, not a crash."""
    cells = shard_of([(v, lm) for v in vllm_versions for lm in lmcache_versions], shard)
    result: dict = {"cells": {}, "seconds": {}}
    for version in dict.fromkeys(v for v, _ in cells):
        mine = [lm for v, lm in cells if v == version]
        start = time.monotonic()
        try:
            python = vllm_env(version, default_lmcache(version))
            layers = {lm: lmcache_layer(python, lm) for lm in mine}
        except PatchToolError as exc:
            for lm in mine:
                result["cells"][f"{version}|{lm}"] = {"install_error": str(exc)[:300]}
            continue
        site = installed_vllm(str(python))
        if status(site).overall == "patched":
            apply(site, revert=True)
        rows: dict[str, Cell] = {lm: {} for lm in mine}
        for label in ("unpatched", "patched"):
            if label == "patched":
                apply(site)
            try:
                for lm in mine:
                    progress(f"vLLM {version} x lmcache {lm} ({label})")
                    rows[lm][label] = _summary(diagnose(python, [layers[lm]]))
            finally:
                if label == "patched":
                    apply(site, revert=True)
        for lm in mine:
            result["cells"][f"{version}|{lm}"] = rows[lm]
        result["seconds"][version] = round(time.monotonic() - start, 1)
    return result


def merge(parts: list[dict]) -> dict:
    """One result from the shards' results (equal to the unsharded run's cells)."""
    merged: dict = {"cells": {}, "seconds": {}}
    for part in parts:
        merged["cells"].update(part["cells"])
        for version, seconds in part["seconds"].items():
            merged["seconds"][version] = merged["seconds"].get(version, 0) + seconds
    merged["cells"] = dict(sorted(merged["cells"].items()))
    return merged


def _cell_text(cell: Cell, label: str) -> str:
    if "install_error" in cell:
        return f"install failed: {cell['install_error'][:80]}"
    info = cell[label]
    chosen = str(info["chosen"]).rsplit(".", 2)
    name = chosen[-2] if len(chosen) >= 2 else info["chosen"]
    if name == "lmcache_mp_connector":
        name = "builtin" if str(info["chosen"]).startswith("vllm.") else "lmcache main"
    name = name.replace("lmcache_mp_connector_", "_")
    if "Unavailable" in str(info["chosen"]):
        name = "none builds"
    if not info["chosen"]:
        name = "vLLM's module does not import"
    return f"{'starts' if info['ok'] else 'FAILS'}: {name}"


def _route_text(cell: Cell, label: str) -> str:
    """What ``kv_connector_module_path`` gives: the module's own class (honoured) or not."""
    routes = cell[label]["module_path_route"]
    if not routes:
        return "-"
    honoured = all(got == f"{module}.LMCacheMPConnector" for module, got in routes.items())
    return "honoured" if honoured else "ignored"


def markdown(result: dict) -> str:
    """The table: rows vLLM, columns lmcache; each cell unpatched / patched."""
    keys = [k.split("|") for k in result["cells"]]
    versions = list(dict.fromkeys(v for v, _ in keys))
    lmcaches = list(dict.fromkeys(lm for _, lm in keys))
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
                cells.append(
                    f"unpatched {_cell_text(cell, 'unpatched')}<br>"
                    f"patched {_cell_text(cell, 'patched')}<br>"
                    f"module path: {_route_text(cell, 'unpatched')} → "
                    f"{_route_text(cell, 'patched')}"
                )
        lines.append(f"| {version} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> None:
    """``matrix.json`` and ``matrix.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / "matrix.md").write_text(markdown(result))
