"""Reading a pairing table: each cell side's verdict, runs of working releases, the counts,
where the resolution disagrees with the real builds, and ``pairs``' recommendation."""

from __future__ import annotations

import json

from packaging.version import Version

from vllm_patches.diagnosis.verdict import SILENT, TableVerdict
from vllm_patches.errors import PatchToolError
from vllm_patches.series.manifest import REPO_ROOT

Cell = dict[str, object]


LABELS = ("unpatched", "patched")


def cell_key(cell: str) -> tuple[Version, Version]:
    version, lmcache = cell.split("|")
    return Version(version), Version(lmcache)


def table_axes(result: dict) -> tuple[list[str], list[str]]:
    """The table's vLLM releases and lmcache releases, oldest first."""
    keys = [k.split("|") for k in result["cells"]]
    return (
        sorted({v for v, _ in keys}, key=Version),
        sorted({lm for _, lm in keys}, key=Version),
    )


def short_name(module: str) -> str:
    """A candidate's name in the table: ``builtin``, ``lmcache main``, ``_0180`` ..."""
    if module.startswith("vllm."):
        return "builtin"
    name = module.rsplit(".", 1)[-1]
    return (
        "lmcache main"
        if name == "lmcache_mp_connector"
        else name.removeprefix("lmcache_mp_connector")
    )


CLEAR_ERROR = "LMCacheMPConnector does not know the adapter API of lmcache"
"""What the series' builtin says when built with an lmcache whose adapter it does not know."""


def clear_error(info: Cell) -> bool:
    """Whether a side stops with the series' one clear error at connector creation: its
    builtin's (0002), or the stand-in an earlier series resolved to (cells measured before)."""
    return "Unavailable" in str(info.get("chosen", "")) or CLEAR_ERROR in str(info.get("error"))


def connector_name(info: Cell) -> str:
    """The short name of the class a cell resolved to."""
    chosen = str(info["chosen"])
    if not chosen:
        return "vLLM's module does not import"
    if clear_error(info):
        return "the series' clear error"
    return short_name(chosen.rsplit(".", 1)[0])


def verdict(cell: Cell, label: str) -> TableVerdict:
    """``works``, ``clear error`` (with or without a server: the series refuses before it
    connects), ``fails``, ``does not import`` (vLLM's connector module, so no resolution ran)
    or ``not built`` (no server, and no refusal before connecting) for one side of a cell."""
    if "install_error" in cell:
        return "fails"
    info = cell[label]
    if not info["chosen"]:
        return "does not import"
    if info["works"]:
        return "works"
    if clear_error(info):
        return "clear error"
    if info["works"] is None:
        return "not built"
    measured = info.get("verdict")
    return next((v for v in SILENT if v == measured), "fails")


def starts_with(result: dict, version: str, label: str) -> str:
    """The lmcache releases with which vLLM ``version`` works (``label``: unpatched or
    patched), as runs of consecutive releases by connector: ``0.4.4-0.5.0 (_0180), ...``;
    a run whose pins conflict with vLLM's names the packages."""
    runs: list[tuple[str, str, str]] = []  # (what, first, last)
    previous = ""
    for lm in table_axes(result)[1]:
        cell = result["cells"].get(f"{version}|{lm}", {})
        what = connector_name(cell[label]) if cell.get(label, {}).get("works") else ""
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


def scheduler_loop(result: dict, version: str) -> bool:
    """Whether vLLM ``version``'s row was measured through vLLM's own scheduler loop
    (``probes/engine_loop.py``); earlier rows took one request through one engine step."""
    return any(
        cell.get("patched", {}).get("scheduler_loop")
        for key, cell in result["cells"].items()
        if key.startswith(f"{version}|")
    )


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
    """Whether some candidate of the cell (either side) worked when built for real: its text
    (``live.built_text``) is ``works`` (the one-step probe), or ``serves (...)`` (vLLM's
    scheduler loop ran clean)."""
    return any(
        state == "works" or state.startswith(("serves (", "works ("))
        for label in LABELS
        for state in cell.get(label, {}).get("candidates", {}).values()
    )


HIT = "every one equal to what the first wave wrote"
"""How a loop's text (``probes/engine_loop.py``) says the second wave loaded the first's KV."""


NO_HIT = "round trip: no hit"
"""How it says the second wave got nothing from the connector."""


def round_trip(text: str) -> bool | None:
    """Whether a candidate's measured text shows the KV round trip on a CPU: True (equal
    bytes loaded), False (no hit), None (no loop ran to the round trip)."""
    if NO_HIT in text:
        return False
    return True if HIT in text else None


def cpu_round_trips(result: dict) -> dict[str, str]:
    """Per lmcache release whose server ran vLLM's scheduler loop: whether a KV round trip on
    a CPU is possible with it, as the table measured it. A release is possible where some
    candidate on some vLLM loaded equal bytes; not possible where every candidate that served,
    on every vLLM, got no hit (the why: which candidates and releases tried)."""
    tried: dict[str, dict[bool, set[tuple[str, str]]]] = {}
    for key, cell in result["cells"].items():
        version, lm = key.split("|")
        for label in LABELS:
            for name, text in cell.get(label, {}).get("candidates", {}).items():
                got = round_trip(text)
                if got is not None:
                    tried.setdefault(lm, {True: set(), False: set()})[got].add((version, name))
    found = {}
    for lm in sorted(tried, key=Version):
        hits, misses = tried[lm][True], tried[lm][False]
        if hits:
            found[lm] = f"possible: equal bytes loaded on vLLM {_releases(hits)}"
            continue
        names = ", ".join(sorted({n for _, n in misses}))
        found[lm] = (
            f"not possible on a CPU: the second wave got no hit from any connector that served "
            f"({names}) on any vLLM measured ({_releases(misses)})"
        )
    return found


def _releases(cells: set[tuple[str, str]]) -> str:
    """``0.12.0`` or ``0.12.0-0.34.0, 31 releases``."""
    versions = sorted({v for v, _ in cells}, key=Version)
    if len(versions) == 1:
        return versions[0]
    return f"{versions[0]}\N{EN DASH}{versions[-1]}, {len(versions)} releases"


def chosen_text(info: Cell) -> str:
    """What the real build of the class one side of a cell chose did, in words."""
    return str(info.get("candidates", {}).get(connector_name(info), ""))


def cell_round_trip(result: dict, version: str, lmcache: str) -> str:
    """What the KV round trip on a CPU did with the class the patched vLLM chose in a cell."""
    text = chosen_text(result["cells"][f"{version}|{lmcache}"]["patched"])
    got = round_trip(text)
    if got is None:
        return "not measured (vLLM's scheduler loop did not run in this cell)"
    if got:
        stand_in = ", with the CUDA-event stand-in" if "with one stand-in" in text else ""
        return f"equal bytes loaded, measured through vLLM's scheduler loop{stand_in}"
    return cpu_round_trips(result)[lmcache]


def disagreements(result: dict) -> list[str]:
    """Patched cells where the resolution's choice differs from the real builds.

    Where some candidate works, the chosen one must work; where none does, the series must stop
    with the clear error (or vLLM's connector module does not import at all, which
    :func:`counts` reports apart: no resolution runs there). Where some candidate of the cell
    loaded the first wave's KV back, the chosen one must have.
    """
    found = []
    for key, cell in result["cells"].items():
        if "install_error" in cell or verdict(cell, "patched") == "not built":
            continue
        patched = verdict(cell, "patched")
        want = "works" if any_works(cell) else "clear error"
        if patched != want and not (patched == "does not import" and want == "clear error"):
            found.append(f"{key}: patched {patched}, measured best {want}")
        texts = cell["patched"].get("candidates", {}).values()
        if round_trip(chosen_text(cell["patched"])) is False and any(map(round_trip, texts)):
            found.append(f"{key}: patched serves with no hit, measured best a round trip")
    return found


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
    versions, lmcaches = table_axes(result)
    if release not in versions:
        newest = max(versions, key=Version)
        msg = (
            f"vLLM {release} is newer than the pairing table (newest: {newest}); the release "
            "watcher measures a new release's row in the pull request that carries the series "
            f"onto it (vllm-patches releases lists what is new)"
            if Version(release) > Version(newest)
            else f"vLLM {release} is not in the pairing table ({versions[0]} … {versions[-1]}); "
            f"measure it with vllm-patches matrix --vllm {release}"
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
                "connector": connector_name(cell["patched"]),
                "pin_conflicts": cell["pin_conflicts"],
            }
        )
    working = [r for r in rows if r["patched"] == "works"]
    fitting = [r for r in working if not r["pin_conflicts"]]
    best = (fitting or working or [None])[0]
    return {
        "vllm": release,
        "recommended": best,
        "round_trip": cell_round_trip(result, release, best["lmcache"]) if best else "",
        "works_patched": starts_with(result, release, "patched"),
        "works_unpatched": starts_with(result, release, "unpatched"),
        "clear_error": [r["lmcache"] for r in reversed(rows) if r["patched"] == "clear error"],
        "not_built": [r["lmcache"] for r in reversed(rows) if r["patched"] == "not built"],
        "measured": result.get("measured", {}),
        "serving_steps": serving_steps(result, release),
        "scheduler_loop": scheduler_loop(result, release),
    }
