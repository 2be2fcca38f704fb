"""The pairing table shipped in matrix/: full size, in step with the README, read right."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import SUPPORTED
from packaging.version import Version
from vllm_patches.diagnosis.matrix import (
    FIRST_LMCACHE,
    disagreements,
    merge,
    pairs,
    pairs_lines,
    pin_conflicts,
    serving_steps,
    summary,
    verdict,
)
from vllm_patches.series.manifest import REPO_ROOT
from vllm_patches.sources.releases import final_releases
from vllm_patches.sources.venvs import default_lmcache, lmcache_layer

SHIPPED = json.loads((REPO_ROOT / "matrix" / "matrix.json").read_text())
FROZEN = "lmcache.integration.vllm.lmcache_mp_connector_{}.LMCacheMPConnector"


def _cell(works: bool, chosen: str, conflicts: tuple[str, ...] = (), *, earlier=False) -> dict:
    info = {"works": works, "chosen": chosen, "error": "", "candidates": {}, "reason": ""}
    if not earlier:  # measured with the serving-engine steps
        info["verdict"] = "works" if works else "fails"
    return {"unpatched": info, "patched": info, "pin_conflicts": list(conflicts)}


@pytest.mark.network
def test_the_shipped_table_is_full_size():
    lmcaches = final_releases("lmcache", FIRST_LMCACHE)
    assert lmcaches[0] == "0.3.9.post2" and "0.5.6" in lmcaches
    assert not any("rc" in v or "dev" in v for v in lmcaches)
    # Releases after the table was measured are for the next run.
    measured = [lm for lm in lmcaches if Version(lm) <= Version("0.5.6")]
    expected = {f"{v}|{lm}" for v in SUPPORTED for lm in measured}
    assert expected <= set(SHIPPED["cells"])
    assert set(SHIPPED["seconds"]) == set(SUPPORTED)


def test_the_readme_shows_the_shipped_table_per_release():
    readme = (REPO_ROOT / "README.md").read_text()
    assert summary(SHIPPED) in readme


def test_the_shipped_table_says_what_was_built_for_real():
    cells = SHIPPED["cells"]
    # vLLM 0.21.0 + lmcache 0.5.3 (MEASURED.md): builtin TypeError, _0180 ZMQError, _0201 works.
    cell = cells["0.21.0|0.5.3"]
    assert verdict(cell, "unpatched") == "fails" and verdict(cell, "patched") == "works"
    assert cell["patched"]["chosen"] == FROZEN.format("0201")
    assert "ZMQError: Invalid argument (addr='t')" in cell["patched"]["candidates"]["_0180"]
    assert "ParallelStrategy" in cell["patched"]["candidates"]["builtin"]
    # 0.19.1 + 0.5.3: the builtin and _0180 fail for real; _0201 works and is picked.
    cell = cells["0.19.1|0.5.3"]
    assert "ZMQError" in cell["patched"]["candidates"]["builtin"]
    assert cell["patched"]["chosen"] == FROZEN.format("0201") and cell["patched"]["works"]
    assert verdict(cells["0.21.0|0.5.6"], "patched") == "clear error"
    assert "no connector can be built" in cells["0.21.0|0.5.6"]["patched"]["error"]


def test_the_resolution_agrees_with_the_real_builds_except_where_it_cannot_see_geometry():
    # Where some candidate works when built for real, the patched vLLM picks one that works;
    # where none does, it stops with the clear error. Except, measured with the serving-engine
    # steps: with lmcache 0.4.7 on vLLM 0.14.0-0.21.0 the one candidate that constructs is
    # lmcache's _0180, which the series' static check passes and picks, and which hands lmcache
    # the old (world size, rank) arguments: with MLA, every TP rank stores (wrong geometry).
    # The fix is a builtin that speaks each lmcache's adapter by name, not a looser check.
    rows = [
        v
        for v in SUPPORTED
        if Version("0.14.0") <= Version(v) <= Version("0.21.0") and serving_steps(SHIPPED, v)
    ]
    assert rows, "the table has rows measured with the serving-engine steps"
    assert disagreements(SHIPPED) == [
        f"{v}|0.4.7: patched wrong geometry, measured best clear error" for v in rows
    ]
    for v in rows:
        patched = SHIPPED["cells"][f"{v}|0.4.7"]["patched"]
        assert patched["chosen"] == FROZEN.format("0180")
        assert (
            "mla on: sent {'kv_world_size': 1, 'kv_worker_id': 0, 'is_kv_writer': True}"
            in (patched["steps"]["geometry error"])
        )
    built = [c for c in SHIPPED["cells"].values() if verdict(c, "patched") != "not built"]
    assert len(built) >= 9 * len(SUPPORTED)


def test_the_shipped_table_names_what_it_measured_and_no_machine_paths():
    text = (REPO_ROOT / "matrix" / "matrix.json").read_text()
    assert "/root/" not in text and "/home/" not in text and "/tmp/" not in text
    measured = SHIPPED["measured"]
    assert set(measured) == {"date", "commit", "vllm", "lmcache"}
    assert measured["vllm"] == sorted(SUPPORTED, key=Version)


def test_merge_orders_releases_as_versions_and_summary_joins_runs():
    builtin = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector.X"
    parts = [
        {
            "cells": {"0.21.0|0.3.10": _cell(True, FROZEN.format("0180"))},
            "seconds": {"0.21.0": 2.0},
        },
        {
            "cells": {
                "0.21.0|0.3.9.post2": _cell(True, FROZEN.format("0180")),
                "0.21.0|0.4.1": _cell(False, builtin),
                "0.21.0|0.4.2": _cell(True, FROZEN.format("0180"), ("numpy: vLLM <2, lmcache 2",)),
                "0.9.0|0.4.2": _cell(True, builtin),
            },
            "seconds": {"0.21.0": 1.5, "0.9.0": 1.0},
            "setup_seconds": {"0.21.0": 3.0},
        },
    ]
    merged = merge(parts)
    assert list(merged["cells"]) == [
        "0.9.0|0.4.2",
        "0.21.0|0.3.9.post2",
        "0.21.0|0.3.10",
        "0.21.0|0.4.1",
        "0.21.0|0.4.2",
    ]
    assert merged["seconds"] == {"0.21.0": 3.5, "0.9.0": 1.0}
    assert merged["setup_seconds"] == {"0.21.0": 3.0}
    rows = summary(merged).splitlines()[2:]
    # A release that fails breaks a run of releases that start; a pin conflict is named.
    assert rows == [
        "| 0.9.0 | 0.4.2 (builtin) | 0.4.2 (builtin) |",
        "| 0.21.0 | 0.3.9.post2\N{EN DASH}0.3.10 (_0180), 0.4.2 (_0180; pins conflict: numpy) "
        "| 0.3.9.post2\N{EN DASH}0.3.10 (_0180), 0.4.2 (_0180; pins conflict: numpy) |",
    ]


def test_each_default_lmcache_fits_vllms_pins_and_works_where_that_was_measured():
    for version in SUPPORTED:
        cell = SHIPPED["cells"][f"{version}|{default_lmcache(version)}"]
        assert not cell["pin_conflicts"], version
        # lmcache 0.4.5 and older have no server that runs on a CPU: not built here.
        assert verdict(cell, "patched") in ("works", "not built"), version


@pytest.mark.network
def test_pin_conflicts_come_from_vllms_requirements_and_lmcaches_metadata():
    layer = lmcache_layer(Path(sys.executable), "0.5.3")
    # vLLM up to 0.19.0 pins transformers below 5; lmcache from 0.4.5 needs 5.4 or later.
    assert pin_conflicts("0.17.1", layer) == ["transformers: vLLM <5,>=4.56.0, lmcache >=5.4"]
    assert pin_conflicts("0.21.0", layer) == []
    conflicting = {k for k, c in SHIPPED["cells"].items() if c["pin_conflicts"]}
    assert "0.19.0|0.4.5" in conflicting and "0.19.1|0.4.5" not in conflicting
    assert "0.19.0|0.4.4" not in conflicting


def test_merge_onto_an_earlier_table_replaces_the_rows_it_measured():
    builtin = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector.X"
    earlier = {
        "cells": {
            "0.16.0|0.4.7": _cell(True, FROZEN.format("0180")),
            "0.21.0|0.4.7": _cell(True, FROZEN.format("0180")),
        },
        "seconds": {"0.16.0": 9.0, "0.21.0": 8.0},
        "setup_seconds": {"0.16.0": 1.0, "0.21.0": 1.0},
        "servers": {"0.4.5": "no server"},
        "measured": {"date": "2026-11-26", "commit": "old", "vllm": ["0.16.0", "0.21.0"],
                     "lmcache": ["0.4.5", "0.4.7"]},
    }  # fmt: skip
    new = {
        "cells": {"0.16.0|0.4.7": _cell(False, builtin)},
        "seconds": {"0.16.0": 3.0},
        "setup_seconds": {"0.16.0": 2.0},
        "measured": {"date": "2026-12-01", "commit": "new", "vllm": ["0.16.0"],
                     "lmcache": ["0.4.7"]},
    }  # fmt: skip
    merged = merge([new], onto=earlier)
    assert merged["cells"]["0.16.0|0.4.7"]["patched"]["chosen"] == builtin
    assert merged["cells"]["0.21.0|0.4.7"] == earlier["cells"]["0.21.0|0.4.7"]
    assert merged["seconds"] == {"0.16.0": 3.0, "0.21.0": 8.0}
    assert merged["setup_seconds"] == {"0.16.0": 2.0, "0.21.0": 1.0}
    assert merged["servers"] == {"0.4.5": "no server"}
    assert merged["measured"] == {
        "date": "2026-12-01",
        "commit": "new, old",
        "vllm": ["0.16.0", "0.21.0"],
        "lmcache": ["0.4.5", "0.4.7"],
    }


def test_rows_measured_by_the_earlier_probe_are_marked_and_pairs_says_so():
    builtin = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector.X"
    result = {
        "cells": {
            "0.20.0|0.4.6": _cell(True, builtin, earlier=True),
            "0.21.0|0.4.6": _cell(True, builtin),
        }
    }
    rows = summary(result).splitlines()
    assert rows[2] == "| 0.20.0 \\* | 0.4.6 (builtin) | 0.4.6 (builtin) |"
    assert rows[3] == "| 0.21.0 | 0.4.6 (builtin) | 0.4.6 (builtin) |"
    assert rows[-1].startswith("\\* measured by the earlier probe (both roles constructed, one ")
    lines = pairs_lines(pairs(result, "0.20.0"))
    assert (
        "measured by the earlier probe (construction and an unhashed lookup): check with "
        "vllm-patches doctor --live before deploying, or re-measure with vllm-patches matrix "
        "--vllm 0.20.0 --lmcache all" in lines
    )
    assert not any("earlier probe" in line for line in pairs_lines(pairs(result, "0.21.0")))
