"""Measuring the pairing table: one venv per vLLM release, each lmcache release laid over it,
every candidate built for real against that release's own server, unpatched and patched;
shards, and merging them."""

from __future__ import annotations

import datetime
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from packaging.version import Version

from vllm_patches._git import run_git
from vllm_patches._proc import stopped_on_signals
from vllm_patches.diagnosis.live import (
    STEP_NAMES,
    CandidateBuild,
    Layer,
    LayerBuild,
    build_layers,
    built_text,
    scheduler_helpers,
    worker_reached,
    works,
)
from vllm_patches.diagnosis.matrix.pins import pin_conflicts
from vllm_patches.diagnosis.matrix.verdicts import LABELS, Cell, cell_key, short_name
from vllm_patches.diagnosis.servers import ServerPool
from vllm_patches.errors import PatchToolError
from vllm_patches.series.manifest import REPO_ROOT, load_manifest
from vllm_patches.sources.releases import final_releases, release_arg
from vllm_patches.sources.venvs import default_lmcache, lmcache_layer, venv_dir, vllm_env
from vllm_patches.targets.apply import apply, recover, status
from vllm_patches.targets.find import installed_vllm

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


def axes(vllm: list[str], lmcache: list[str]) -> tuple[list[str], list[str]]:
    """The releases a run measures: ``all`` expanded, each release checked and normalised.

    :raises PatchToolError: a vLLM release without a series, or not a release number.
    """
    manifest = load_manifest()
    if vllm == ["all"]:
        vllm = sorted(manifest.releases, key=Version)
    if lmcache == ["all"]:
        lmcache = final_releases("lmcache", FIRST_LMCACHE)
    vllm = [release_arg(v) for v in vllm]
    lmcache = [release_arg(lm) for lm in lmcache]
    for version in vllm:
        manifest.release(version)
    return vllm, lmcache


def load_results(paths: list[Path]) -> list[dict]:
    """The ``matrix.json`` files of shards, each checked to be one."""
    parts = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            msg = f"cannot read {path} as a matrix.json ({exc}); give the files matrix wrote"
            raise PatchToolError(msg) from None
        if not isinstance(data, dict) or not isinstance(data.get("cells"), dict):
            msg = f"{path} is not a matrix.json (no cells); give the files matrix wrote"
            raise PatchToolError(msg)
        parts.append(data)
    return parts


def shard_of(cells: list[tuple[str, str]], shard: str | None) -> list[tuple[str, str]]:
    """The cells of shard ``i/n`` (1-based), in contiguous blocks; all cells without one.

    Blocks keep each vLLM release's cells together, so a shard builds few vLLM venvs.
    """
    if shard is None:
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


def _summary(data: LayerBuild) -> Cell:
    """One cell side: the class chosen and what a real build of every candidate did."""
    chosen = data.get("chosen_build", {})
    candidates = {}
    for candidate in data.get("candidates", []):
        key = "builtin" if candidate.get("builtin") else short_name(candidate["module"])
        candidates[key] = built_text(candidate)[:300]
    error = data.get("import_error") or (chosen.get("error", "") if chosen else "")
    return {
        "chosen": data.get("chosen", ""),
        "works": works(chosen) if chosen else (None if "chosen" in data else False),
        "verdict": chosen.get("verdict", ""),
        "steps": _steps(chosen),
        "error": error[:300],
        "candidates": candidates,
        "reason": data.get("resolution", {}).get("reason", "")[:300],
        "scheduler_loop": bool(data.get("engine_loop")),
    }


def _steps(chosen: CandidateBuild) -> dict[str, object]:
    """The chosen class's columns: each step's outcome, the hash count, how far the worker went."""
    found: dict[str, object] = {
        name: chosen[key] for key, name in STEP_NAMES.items() if key in chosen
    }
    if "block_hashes" in chosen:
        found["block hashes"] = chosen["block_hashes"]
    if "worker" in chosen:
        found["worker reached"] = worker_reached(chosen)
    if chosen.get("geometry_error"):
        found["geometry error"] = chosen["geometry_error"]
    if "second_lookup" in chosen:
        found["same prompt looked up again (nothing stored)"] = chosen["second_lookup"]
    return found


def measured(vllm_versions: list[str], lmcache_versions: list[str]) -> dict:
    """When, from which commit of this project, and which releases a table measured."""
    try:
        commit = run_git(["rev-parse", "HEAD"], REPO_ROOT).strip()
    except PatchToolError:
        commit = "unknown (not run from a clone)"
    today = datetime.date.today().isoformat()
    return {
        "date": today,
        "commit": commit,
        "vllm": sorted(vllm_versions, key=Version),
        "lmcache": sorted(lmcache_versions, key=Version),
        "rows": {v: [_stamp(today, commit, lmcache_versions)] for v in vllm_versions},
    }


def _row_layers(
    pool: ServerPool, python: Path, layers: dict[str, Path]
) -> tuple[list[Layer], dict[str, str]]:
    """Each lmcache layer with its release's server; why a release has none."""
    found, missing = [], {}
    for lm, layer in layers.items():
        server = pool.get(python, layer, lm)
        if isinstance(server, str):
            missing[lm] = server
            found.append(Layer(layer, None))
        else:
            found.append(Layer(layer, server.url))
    return found, missing


def run_matrix(
    vllm_versions: list[str],
    lmcache_versions: list[str],
    shard: str | None = None,
    progress: Callable[[str], None] = lambda _: None,
    *,
    discard_venvs: bool = False,
    log_dir: Path | None = None,
) -> dict:
    """Measure every (vLLM, lmcache) cell of the shard; a failing install is a cell, not a crash.

    Each cell's candidates are built for real against that lmcache release's own server
    (one server per release, started on first use and reused by every row and side).

    :param discard_venvs: remove each vLLM venv this run built once its cells are measured
        (the cache otherwise keeps ~1 GB per vLLM release beside the others: they share what
        is identical).
    :param log_dir: where the servers' logs go (a temporary directory otherwise).
    :returns: ``cells`` by ``"vllm|lmcache"``; per vLLM release the ``setup_seconds`` (venv
        and lmcache layers) and the ``seconds`` its cells took; ``servers``: per lmcache
        release, why it has no server that runs here (releases with one are not listed).
    """
    cells = shard_of([(v, lm) for v in vllm_versions for lm in lmcache_versions], shard)
    result: dict = {"cells": {}, "seconds": {}, "setup_seconds": {}, "servers": {}}
    result["measured"] = measured(sorted({v for v, _ in cells}, key=Version), lmcache_versions)
    with stopped_on_signals(), ServerPool(log_dir) as pool:
        for version in dict.fromkeys(v for v, _ in cells):
            mine = [lm for v, lm in cells if v == version]
            _measure_row(result, pool, version, mine, progress, discard_venvs=discard_venvs)
        result["servers"] = dict(sorted(pool.failures.items(), key=lambda kv: Version(kv[0])))
    return result


def _both_sides(python: Path, layers: list[Layer], progress: Callable[[str], None]) -> list[Cell]:
    """Each layer's cell sides: built unpatched, then with the series applied (and reverted)."""
    site = installed_vllm(str(python))
    recover(site)
    if status(site).overall == "patched":
        apply(site, revert=True)
    rows: list[Cell] = [{} for _ in layers]
    helpers, _ = scheduler_helpers(site.version)
    for label in LABELS:
        if label == "patched":
            apply(site)
        progress(label)
        try:
            built = build_layers(python, layers, helpers=helpers)
            for row, data in zip(rows, built, strict=True):
                row[label] = _summary(data)
        finally:
            if label == "patched":
                apply(site, revert=True)
    return rows


def _measure_row(
    result: dict,
    pool: ServerPool,
    version: str,
    mine: list[str],
    progress: Callable[[str], None],
    *,
    discard_venvs: bool,
) -> None:
    """Measure vLLM ``version`` with each lmcache release in ``mine``, into ``result``."""
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
        return
    found, missing = _row_layers(pool, python, layers)
    result["setup_seconds"][version] = round(time.monotonic() - start, 1)
    start = time.monotonic()
    rows = _both_sides(python, found, lambda label: progress(f"vLLM {version} ({label})"))
    for lm, row in zip(mine, rows, strict=True):
        cell = {**row, "pin_conflicts": pin_conflicts(version, layers[lm])}
        if lm in missing:
            cell["not_built"] = missing[lm]
        result["cells"][f"{version}|{lm}"] = cell
    result["seconds"][version] = round(time.monotonic() - start, 1)
    if discard_venvs and built_here:
        pool.close()  # its servers may run from this venv
        shutil.rmtree(venv)


def merge(parts: list[dict], onto: dict | None = None) -> dict:
    """One result from the shards' results (equal to the unsharded run's cells).

    :param onto: an earlier table to lay the shards over: their cells replace its cells, and
        a vLLM release they measured takes their timings; the rest is kept as it was.
    """
    merged: dict = {"cells": {}, "seconds": {}, "setup_seconds": {}, "servers": {}}
    for part in parts:
        merged["cells"].update(part["cells"])
        merged["servers"].update(part.get("servers", {}))
        for key in ("seconds", "setup_seconds"):
            for version, seconds in part.get(key, {}).items():
                merged[key][version] = round(merged[key].get(version, 0) + seconds, 1)
    stamps = [part["measured"] for part in parts if part.get("measured")]
    if onto is not None:
        for key in ("cells", "seconds", "setup_seconds", "servers"):
            merged[key] = {**onto.get(key, {}), **merged[key]}
    merged["cells"] = dict(sorted(merged["cells"].items(), key=lambda kv: cell_key(kv[0])))
    merged["servers"] = dict(sorted(merged["servers"].items(), key=lambda kv: Version(kv[0])))
    # Each cell keeps the date and commit it was measured with: a row's stamps, newest first,
    # each naming the lmcache releases it still holds (a later shard over an earlier one, the
    # shards over the earlier table, as for the cells).
    rows: dict[str, list[dict]] = {}
    for stamp in reversed(stamps):
        _lay_under(rows, _row_stamps(stamp))
    if onto is not None and onto.get("measured"):
        stamps.append(onto["measured"])
        _lay_under(rows, _row_stamps(onto["measured"]))
    if stamps:
        merged["measured"] = {
            "date": max(s["date"] for s in stamps),
            "commit": _commits_held(stamps, rows, merged["cells"]),
            "vllm": sorted({v for s in stamps for v in s["vllm"]}, key=Version),
            "lmcache": sorted({lm for s in stamps for lm in s["lmcache"]}, key=Version),
            "rows": dict(sorted(rows.items(), key=lambda kv: Version(kv[0]))),
        }
    return merged


def _commits_held(stamps: list[dict], rows: dict[str, list[dict]], cells: dict) -> str:
    """The commits the table's cells were measured with, newest run first: those of the row
    stamps, or every one the runs name where some cell predates row stamps."""
    named = [c for s in stamps for c in s["commit"].split(", ")]
    stamped = {f"{v}|{lm}" for v, runs in rows.items() for s in runs for lm in s["lmcache"]}
    if not set(cells) <= stamped:
        return ", ".join(dict.fromkeys(named))
    held = {s["commit"] for runs in rows.values() for s in runs}
    return ", ".join(dict.fromkeys(c for c in named if c in held))


def _stamp(date: str, commit: str, lmcache: list[str]) -> dict:
    return {"date": date, "commit": commit, "lmcache": sorted(lmcache, key=Version)}


def _row_stamps(stamp: dict) -> dict[str, list[dict]]:
    """When and with which commit each cell of a table was measured, by row.

    A table written before cells kept their own stamps knows that only if one run wrote it.
    """
    if "rows" in stamp:
        return stamp["rows"]
    if ", " in stamp["commit"]:
        return {}
    return {v: [_stamp(stamp["date"], stamp["commit"], stamp["lmcache"])] for v in stamp["vllm"]}


def _lay_under(rows: dict[str, list[dict]], older: dict[str, list[dict]]) -> None:
    """Add ``older``'s stamps after ``rows``' own, for the lmcache releases not yet stamped."""
    for version, stamps in older.items():
        have = rows.setdefault(version, [])
        covered = {lm for s in have for lm in s["lmcache"]}
        for s in stamps:
            left = [lm for lm in s["lmcache"] if lm not in covered]
            if left:
                have.append({**s, "lmcache": left})
                covered.update(left)
