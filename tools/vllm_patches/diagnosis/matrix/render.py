"""Writing a pairing table for people: ``matrix.md``, ``matrix.json``, the README's per-release
summary and ``pairs``' lines."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_patches.diagnosis.matrix.verdicts import (
    LABELS,
    Cell,
    connector_name,
    cpu_round_trips,
    scheduler_loop,
    serving_steps,
    starts_with,
    table_axes,
    verdict,
)
from vllm_patches.diagnosis.verdict import SILENT
from vllm_patches.errors import PatchToolError
from vllm_patches.sources.releases import cache_root


def _cell_text(cell: Cell, label: str) -> str:
    if "install_error" in cell:
        return f"install failed: {cell['install_error'][:80]}"
    info = cell[label]
    what = verdict(cell, label)
    text = f"{what.upper() if what in ('fails', *SILENT) else what}: {connector_name(info)}"
    if what == "fails" and info["chosen"]:
        text += f" ({info['error'].split(':', 1)[0]})"
    return text


EARLIER_PROBE = (
    "\\* measured by the earlier probe (both roles constructed, one lookup without block "
    "hashes; the worker not driven, the geometry not checked): re-measure with "
    "`vllm-patches matrix --vllm VERSION --lmcache all`"
)


ONE_STEP = (
    "\u2020 measured with the one-step probe (one hashed request through lookup, allocation "
    "and metadata, the worker driven once, the TP 2 geometry), not yet through vLLM's "
    "scheduler loop: check with `vllm-patches doctor --live` before deploying, or re-measure "
    "with `vllm-patches matrix --vllm VERSION --lmcache all`"
)


def summary(result: dict) -> str:
    """Per vLLM release, the lmcache releases that work and through which connector; rows
    measured by the earlier probe are marked ``*``, rows measured with one engine step and
    not vLLM's scheduler loop ``\u2020``, each explained below the table."""
    lines = [
        "| vLLM | works unpatched with lmcache | works patched with lmcache |",
        "|---|---|---|",
    ]
    notes: list[str] = []
    for version in table_axes(result)[0]:
        unpatched, patched = (starts_with(result, version, label) for label in LABELS)
        if not serving_steps(result, version):
            mark, note = " \\*", EARLIER_PROBE
        elif not scheduler_loop(result, version):
            mark, note = " \u2020", ONE_STEP
        else:
            mark, note = "", ""
        if note and note not in notes:
            notes.append(note)
        lines.append(f"| {version}{mark} | {unpatched} | {patched} |")
    for note in notes:
        lines += ["", note]
    trips = cpu_round_trips(result)
    if trips:
        head = "KV round trip on a CPU through vLLM's scheduler loop, by lmcache release:"
        lines += ["", head, ""]
        lines += [f"- lmcache {lm}: {what}" for lm, what in trips.items()]
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    """The table: rows vLLM, columns lmcache; each cell unpatched / patched."""
    versions, lmcaches = table_axes(result)
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
    deep = sum("verdict" in c.get("patched", {}) for c in result["cells"].values())
    cells, seconds = len(result["cells"]), sum(result["seconds"].values())
    setup = sum(result.get("setup_seconds", {}).values())
    built = deep or cells
    timing = (
        f"{built} cells built for real in {seconds:,.0f} s ({seconds / max(built, 1):.1f} s a "
        f"cell, unpatched and patched), plus {setup:,.0f} s of venv, lmcache and server set-up"
    )
    if deep and deep < cells:
        timing += (
            f"; the other {cells - deep} cells (lmcache releases with no server that runs here: "
            "imports only) are kept from the run the table was merged onto"
        )
    timing += ".\n\n"
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

*works*: every step did, and vLLM's own scheduler loop ran clean (`probes/engine_loop.py`:
two waves of hashed requests, chunked prefill, decode, preemption and resume, the connector's
delayed frees, a KV round trip on a CPU; rows marked \u2020 were measured with the one step
only); *HANGS*: a step did not return within its bound (the frame it blocked in is named);
*WRONG GEOMETRY*: a tensor-parallel worker would read and write the wrong KV pieces; *WRONG
BLOCKS*: the connector asked a load or store of blocks the scheduler had not given that
request; *LEAKS*: blocks were left held when every request had finished; *clear error*: the
series stopped at connector creation with its one error, because no candidate works (where
no server of that lmcache runs here, measured by constructing the class with nothing
listening: the series checks lmcache's adapter API before it connects); *FAILS*: the engine
would die (the first error, and in the loop its step and frame, are named); *not built*: no
server of that lmcache release runs here (and where the class was constructed with nothing
listening, it did not refuse: lmcache 0.4.4 and 0.4.5's constructors wait for their server).
Not measured (no GPU): the KV cache registered by CUDA IPC, lmcache's GPU transfer kernels, GPU
KV layouts, a real model's numerics.

"""


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
    if answer.get("round_trip"):
        lines.append(f"KV round trip on a CPU with that lmcache: {answer['round_trip']}")
    if answer.get("clear_error"):
        lines.append(
            "stops at start-up with the series' one error naming both versions and the fix "
            "(the builtin does not know that lmcache's adapter API; measured, no server needed): "
            + ", ".join(answer["clear_error"])
        )
    if answer["not_built"]:
        lines.append(
            "not built here (no server of that lmcache release runs on a CPU): "
            + ", ".join(answer["not_built"])
        )
    if answer.get("serving_steps", True) and not answer.get("scheduler_loop", True):
        lines.append(
            "measured with the one-step probe, not yet through vLLM's scheduler loop: check "
            "with vllm-patches doctor --live before deploying, or re-measure with "
            f"vllm-patches matrix --vllm {answer['vllm']} --lmcache all"
        )
    if not answer.get("serving_steps", True):
        lines.append(
            f"measured by the earlier probe (construction and an unhashed lookup): check with "
            f"vllm-patches doctor --live before deploying, or re-measure with "
            f"vllm-patches matrix --vllm {answer['vllm']} --lmcache all"
        )
    stamp = answer["measured"]
    row = stamp.get("rows", {}).get(answer["vllm"], [])
    cell = [s for s in row if best is not None and best["lmcache"] in s["lmcache"]]
    if cell:  # the recommended cell's
        lines.append(f"measured {cell[0]['date']} (vllm-lmcache-mp {cell[0]['commit'][:12]})")
    elif stamp:  # no recommendation, or a cell merged before cells kept their own stamps
        lines.append(f"measured on or before {stamp['date']}")
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
