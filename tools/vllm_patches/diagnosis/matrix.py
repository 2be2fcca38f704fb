"""The vLLM x lmcache pairing table: per cell, each candidate's imports/builds and the choice,
unpatched and patched. One venv per vLLM release; each lmcache release is laid over it."""

from __future__ import annotations

import datetime
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

from vllm_patches._git import run_git
from vllm_patches._proc import stopped_on_signals
from vllm_patches.diagnosis.live import (
    STEP_NAMES,
    Layer,
    build_layers,
    built_text,
    worker_reached,
    works,
)
from vllm_patches.diagnosis.servers import ServerPool
from vllm_patches.errors import PatchToolError
from vllm_patches.series.manifest import REPO_ROOT, load_manifest
from vllm_patches.sources.releases import cache_root, final_releases, read_sdist_file, release_arg
from vllm_patches.sources.venvs import default_lmcache, lmcache_layer, venv_dir, vllm_env
from vllm_patches.targets.apply import apply, recover, status
from vllm_patches.targets.find import installed_vllm

Cell = dict[str, object]
BAD_VERDICTS = ("hangs", "wrong geometry")
"""Verdicts of a class that constructs yet would not serve: the engine hangs on a request,
or a tensor-parallel worker reads and writes the wrong KV pieces."""
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


def _short(module: str) -> str:
    """A candidate's name in the table: ``builtin``, ``lmcache main``, ``_0180`` ..."""
    if module.startswith("vllm."):
        return "builtin"
    name = module.rsplit(".", 1)[-1]
    return (
        "lmcache main"
        if name == "lmcache_mp_connector"
        else name.removeprefix("lmcache_mp_connector")
    )


def _summary(data: dict) -> Cell:
    """One cell side: the class chosen and what a real build of every candidate did."""
    chosen = data.get("chosen_build", {})
    candidates = {}
    for candidate in data.get("candidates", []):
        key = "builtin" if candidate.get("builtin") else _short(candidate["module"])
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
    }


def _steps(chosen: dict) -> dict[str, object]:
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
        found["store, then lookup"] = chosen["second_lookup"]
    return found


def measured(vllm_versions: list[str], lmcache_versions: list[str]) -> dict:
    """When, from which commit of this project, and which releases a table measured."""
    try:
        commit = run_git(["rev-parse", "HEAD"], REPO_ROOT).strip()
    except PatchToolError:
        commit = "unknown (not run from a clone)"
    return {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "vllm": sorted(vllm_versions, key=Version),
        "lmcache": sorted(lmcache_versions, key=Version),
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
        (the cache otherwise keeps ~3.5 GB per vLLM release).
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
    for label in _LABELS:
        if label == "patched":
            apply(site)
        progress(label)
        try:
            for row, data in zip(rows, build_layers(python, layers), strict=True):
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


def merge(parts: list[dict]) -> dict:
    """One result from the shards' results (equal to the unsharded run's cells)."""
    merged: dict = {"cells": {}, "seconds": {}, "setup_seconds": {}, "servers": {}}
    for part in parts:
        merged["cells"].update(part["cells"])
        merged["servers"].update(part.get("servers", {}))
        for key in ("seconds", "setup_seconds"):
            for version, seconds in part.get(key, {}).items():
                merged[key][version] = round(merged[key].get(version, 0) + seconds, 1)
    merged["cells"] = dict(sorted(merged["cells"].items(), key=lambda kv: _key(kv[0])))
    merged["servers"] = dict(sorted(merged["servers"].items(), key=lambda kv: Version(kv[0])))
    stamps = [part["measured"] for part in parts if "measured" in part]
    if stamps:
        merged["measured"] = {
            "date": max(s["date"] for s in stamps),
            "commit": ", ".join(dict.fromkeys(s["commit"] for s in stamps)),
            "vllm": sorted({v for s in stamps for v in s["vllm"]}, key=Version),
            "lmcache": sorted({lm for s in stamps for lm in s["lmcache"]}, key=Version),
        }
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


def clear_error(info: Cell) -> bool:
    """Whether a side resolved to the series' stand-in that stops with the one clear error."""
    return "Unavailable" in str(info.get("chosen", ""))


def _connector(info: Cell) -> str:
    """The short name of the class a cell resolved to."""
    chosen = str(info["chosen"])
    if not chosen:
        return "vLLM's module does not import"
    if clear_error(info):
        return "the series' clear error"
    return _short(chosen.rsplit(".", 1)[0])


def verdict(cell: Cell, label: str) -> str:
    """``works``, ``clear error``, ``fails``, ``does not import`` (vLLM's connector module,
    so no resolution ran) or ``not built`` (no server) for one side of a cell."""
    if "install_error" in cell:
        return "fails"
    info = cell[label]
    if not info["chosen"]:
        return "does not import"
    if info["works"]:
        return "works"
    if info["works"] is None:
        return "not built"
    if clear_error(info):
        return "clear error"
    return str(info.get("verdict")) if info.get("verdict") in BAD_VERDICTS else "fails"


def _cell_text(cell: Cell, label: str) -> str:
    if "install_error" in cell:
        return f"install failed: {cell['install_error'][:80]}"
    info = cell[label]
    what = verdict(cell, label)
    text = f"{what.upper() if what in ('fails', *BAD_VERDICTS) else what}: {_connector(info)}"
    if what == "fails" and info["chosen"]:
        text += f" ({info['error'].split(':', 1)[0]})"
    return text


def starts_with(result: dict, version: str, label: str) -> str:
    """The lmcache releases with which vLLM ``version`` works (``label``: unpatched or
    patched), as runs of consecutive releases by connector: ``0.4.4-0.5.0 (_0180), ...``;
    a run whose pins conflict with vLLM's names the packages."""
    runs: list[tuple[str, str, str]] = []  # (what, first, last)
    previous = ""
    for lm in _axes(result)[1]:
        cell = result["cells"].get(f"{version}|{lm}", {})
        what = _connector(cell[label]) if cell.get(label, {}).get("works") else ""
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


def serving_steps(result: dict, version: str) -> bool:
    """Whether vLLM ``version``'s row was measured with the serving-engine steps (hashed
    requests, the worker driven, the TP 2 geometry, bounded steps); rows of earlier runs
    were measured by construction and an unhashed lookup only."""
    return any(
        "verdict" in cell.get("patched", {})
        for key, cell in result["cells"].items()
        if key.startswith(f"{version}|")
    )


EARLIER_PROBE = (
    "\\* measured by the earlier probe (both roles constructed, one lookup without block "
    "hashes; the worker not driven, the geometry not checked): re-measure with "
    "`vllm-patches matrix --vllm VERSION --lmcache all`"
)


def summary(result: dict) -> str:
    """Per vLLM release, the lmcache releases that work and through which connector; rows
    measured by the earlier probe are marked ``*`` and explained below the table."""
    lines = [
        "| vLLM | works unpatched with lmcache | works patched with lmcache |",
        "|---|---|---|",
    ]
    earlier = False
    for version in _axes(result)[0]:
        unpatched, patched = (starts_with(result, version, label) for label in _LABELS)
        mark = "" if serving_steps(result, version) else " \\*"
        earlier = earlier or bool(mark)
        lines.append(f"| {version}{mark} | {unpatched} | {patched} |")
    if earlier:
        lines += ["", EARLIER_PROBE]
    return "\n".join(lines) + "\n"


def counts(result: dict) -> dict[str, int]:
    """The closing figures: cells that work patched, that work only patched, where none can."""
    found = {
        "cells": 0,
        "patched works": 0,
        "only patched works": 0,
        "nothing works": 0,
        "patched hangs": 0,
        "patched wrong geometry": 0,
        "not built": 0,
        "does not import": 0,
    }
    for cell in result["cells"].values():
        found["cells"] += 1
        if "install_error" in cell:
            continue
        patched, unpatched = verdict(cell, "patched"), verdict(cell, "unpatched")
        if "not built" in (patched, unpatched):
            found["not built"] += 1
            continue
        found["does not import"] += patched == "does not import"
        found["patched works"] += patched == "works"
        found["only patched works"] += patched == "works" and unpatched != "works"
        found["patched hangs"] += patched == "hangs"
        found["patched wrong geometry"] += patched == "wrong geometry"
        found["nothing works"] += not any_works(cell)
    return found


def any_works(cell: Cell) -> bool:
    """Whether some candidate of the cell (either side) worked when built for real."""
    return any(
        state == "works"
        for label in _LABELS
        for state in cell.get(label, {}).get("candidates", {}).values()
    )


def disagreements(result: dict) -> list[str]:
    """Patched cells where the resolution's choice differs from the real builds.

    Where some candidate works, the chosen one must work; where none does, the series' stand-in
    must stop with the clear error (or vLLM's connector module does not import at all, which
    :func:`counts` reports apart: no resolution runs there).
    """
    found = []
    for key, cell in result["cells"].items():
        if "install_error" in cell or verdict(cell, "patched") == "not built":
            continue
        patched = verdict(cell, "patched")
        want = "works" if any_works(cell) else "clear error"
        if patched != want and not (patched == "does not import" and want == "clear error"):
            found.append(f"{key}: patched {patched}, measured best {want}")
    return found


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
                    f"patched {_cell_text(cell, 'patched')}{conflicts}"
                )
        lines.append(f"| {version} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _scrub(text: str) -> str:
    """No machine paths in the table."""
    for path in (str(cache_root()), str(Path.home())):
        text = text.replace(path, "~")
    return text


def write(result: dict, out: Path) -> None:
    """``matrix.json`` and ``matrix.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(_scrub(json.dumps(result, indent=2, sort_keys=True)) + "\n")
    cells, seconds = len(result["cells"]), sum(result["seconds"].values())
    setup = sum(result.get("setup_seconds", {}).values())
    timing = (
        f"{cells} cells measured in {seconds:,.0f} s ({seconds / max(cells, 1):.1f} s a cell, "
        f"unpatched and patched), plus {setup:,.0f} s of venv and lmcache set-up.\n\n"
    )
    servers = "".join(f"- lmcache {lm}: {why}\n" for lm, why in result.get("servers", {}).items())
    if servers:
        servers = "Not built for real (no server of that release runs here):\n\n" + servers + "\n"
    (out / "matrix.md").write_text(
        _scrub(timing + LEGEND + servers + summary(result) + "\n" + markdown(result))
    )


LEGEND = """Each cell: the class `LMCacheMPConnector` resolves to, unpatched and patched, and what
building it for real against that lmcache release's own server did, step by step as a serving
engine asks: the scheduler constructs; its round trip (a request carrying real block hashes
from vLLM's own hasher: lookup, allocation, metadata, finish); the worker constructs; the
worker driven with the scheduler's metadata (`bind_connector_metadata`, `start_load_kv`,
`wait_for_save`, `get_finished`, `clear_connector_metadata`, `shutdown`; a call that stops at
the accelerator or at the missing KV cache registration is "not run here", with why); and the
geometry (what a worker of rank 1 in tensor-parallel size 2 hands lmcache, MLA off and on,
against what it must). Every step runs under a 30 s bound.

*works*: every step did; *HANGS*: a step did not return within its bound (the frame it blocked
in is named); *WRONG GEOMETRY*: a tensor-parallel worker would read and write the wrong KV
pieces; *clear error*: the series' stand-in stopped at connector creation with its one error,
because no candidate works; *FAILS*: the engine would die (the first error is named); *not
built*: no server of that lmcache release runs here. Not measured (no GPU): registering the KV
caches, the KV transfer itself, GPU KV formats, a cache hit returning the same tokens; on a
CPU the server learns no prefix (the store is submitted from `wait_for_save`, which needs the
registered KV caches), so a second lookup of the same prompt matches 0 tokens.

"""


def shipped() -> dict:
    """The pairing table this project ships (``matrix/matrix.json``): the one reader of it."""
    path = REPO_ROOT / "matrix" / "matrix.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        msg = f"cannot read the shipped pairing table {path} ({exc}); reinstall vllm-lmcache-mp"
        raise PatchToolError(msg) from None


def pairs(result: dict, version: str) -> dict:
    """Which lmcache to install for vLLM ``version``: the recommendation and what it rests on.

    The recommendation is the newest lmcache release with which the patched vLLM works when
    built for real and whose pins fit vLLM's; else the newest that works, pins named.
    """
    release = Version(version).public
    versions, lmcaches = _axes(result)
    if release not in versions:
        msg = (
            f"vLLM {release} is not in the pairing table ({versions[0]} … {versions[-1]}); "
            "measure it with vllm-patches matrix --vllm " + release
        )
        raise PatchToolError(msg)
    rows = []
    for lm in reversed(lmcaches):
        cell = result["cells"].get(f"{release}|{lm}")
        if cell is None or "install_error" in cell:
            continue
        rows.append(
            {
                "lmcache": lm,
                "patched": verdict(cell, "patched"),
                "unpatched": verdict(cell, "unpatched"),
                "connector": _connector(cell["patched"]),
                "pin_conflicts": cell["pin_conflicts"],
            }
        )
    working = [r for r in rows if r["patched"] == "works"]
    fitting = [r for r in working if not r["pin_conflicts"]]
    return {
        "vllm": release,
        "recommended": (fitting or working or [None])[0],
        "works_patched": starts_with(result, release, "patched"),
        "works_unpatched": starts_with(result, release, "unpatched"),
        "not_built": [r["lmcache"] for r in reversed(rows) if r["patched"] == "not built"],
        "measured": result.get("measured", {}),
        "serving_steps": serving_steps(result, release),
    }


def pairs_lines(answer: dict) -> list[str]:
    """``pairs`` for people."""
    best = answer["recommended"]
    if best is None:
        head = f"vLLM {answer['vllm']}: no lmcache release works with it when built for real here"
    else:
        pins = (
            "; its pins conflict with vLLM's: " + ", ".join(best["pin_conflicts"])
            if best["pin_conflicts"]
            else "; pins fit"
        )
        head = (
            f"vLLM {answer['vllm']}: install lmcache=={best['lmcache']} and apply the series "
            f"(connector: {best['connector']}{pins})"
        )
    lines = [
        head,
        f"works patched with lmcache: {answer['works_patched']}",
        f"works unpatched with lmcache: {answer['works_unpatched']}",
    ]
    if answer["not_built"]:
        lines.append(
            "not built here (no server of that lmcache release runs on a CPU): "
            + ", ".join(answer["not_built"])
        )
    if not answer.get("serving_steps", True):
        lines.append(
            f"measured by the earlier probe (construction and an unhashed lookup): check with "
            f"vllm-patches doctor --live before deploying, or re-measure with "
            f"vllm-patches matrix --vllm {answer['vllm']} --lmcache all"
        )
    stamp = answer["measured"]
    if stamp:
        lines.append(
            f"measured {stamp.get('date')} (vllm-lmcache-mp {stamp.get('commit', '')[:12]})"
        )
    return lines


README_START = "<!-- pairing-table:start (vllm-patches matrix --readme README.md writes this) -->"
README_END = "<!-- pairing-table:end -->"


def update_readme(result: dict, readme: Path) -> None:
    """Put the per-release summary of ``result`` between the README's two markers."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        msg = f"{readme} has no pairing-table markers ({README_START} ... {README_END})"
        raise PatchToolError(msg)
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(f"{head}{README_START}\n{summary(result)}{README_END}{tail}")
