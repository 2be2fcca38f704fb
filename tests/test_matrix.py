"""The pairing table shipped in matrix/: full size, in step with the README, read right."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import SUPPORTED
from packaging.version import Version
from vllm_patches._git import git_ok
from vllm_patches.diagnosis.matrix import (
    FIRST_LMCACHE,
    cpu_round_trips,
    disagreements,
    merge,
    pairs,
    pairs_lines,
    pin_conflicts,
    serving_steps,
    summary,
    verdict,
)
from vllm_patches.diagnosis.matrix.verdicts import cell_round_trip, round_trip
from vllm_patches.series.manifest import REPO_ROOT
from vllm_patches.sources.releases import final_releases
from vllm_patches.sources.venvs import default_lmcache, lmcache_layer

SHIPPED = json.loads((REPO_ROOT / "matrix" / "matrix.json").read_text())
FROZEN = "lmcache.integration.vllm.lmcache_mp_connector_{}.LMCacheMPConnector"
BUILTIN = (
    "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector.LMCacheMPConnectorUpstream"
)


def _cell(
    works: bool, chosen: str, conflicts: tuple[str, ...] = (), *, earlier=False, loop=True
) -> dict:
    info = {"works": works, "chosen": chosen, "error": "", "candidates": {}, "reason": ""}
    if not earlier:  # measured with the serving-engine steps
        info["verdict"] = ("serves" if loop else "works") if works else "fails"
        info["scheduler_loop"] = loop
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
    # vLLM 0.21.0 + lmcache 0.5.3 (MEASURED.md): builtin TypeError, _0180 ZMQError, _0201 works;
    # patched, the builtin speaks lmcache's adapter by name and works too, and _0201 (made for
    # this vLLM, measured good with 0.5.3) is the one chosen.
    cell = cells["0.21.0|0.5.3"]
    assert verdict(cell, "unpatched") == "fails" and verdict(cell, "patched") == "works"
    assert "ParallelStrategy" in cell["unpatched"]["candidates"]["builtin"]
    assert cell["patched"]["chosen"] == FROZEN.format("0201")
    assert "ZMQError: Invalid argument (addr='t')" in cell["patched"]["candidates"]["_0180"]
    # Through vLLM's scheduler loop: lmcache 0.5.3's adapter makes no transfer event, so the
    # CPU round trip needs the one stand-in, and says so.
    builtin = cell["patched"]["candidates"]["builtin"]
    assert builtin.startswith("serves (") and "every one equal to what the first wave" in builtin
    assert "with one stand-in: a completed CPU event in place of torch.cuda.Event" in builtin
    # 0.19.1 + 0.5.3: the builtin fails for real unpatched (ZMQError) and works patched.
    cell = cells["0.19.1|0.5.3"]
    assert "ZMQError" in cell["unpatched"]["candidates"]["builtin"]
    assert cell["patched"]["chosen"] == BUILTIN and cell["patched"]["works"]
    # lmcache 0.5.6 (no copies) on vLLM 0.21.0: only the builtin can serve it.
    cell = cells["0.21.0|0.5.6"]
    assert verdict(cell, "unpatched") == "fails"
    assert verdict(cell, "patched") == "works" and cell["patched"]["chosen"] == BUILTIN


SERVED = ("0.4.6", "0.4.7", "0.5.0", "0.5.1", "0.5.2", "0.5.3", "0.5.4", "0.5.5", "0.5.6")
"""The lmcache releases whose multiprocess server runs on a CPU: their cells are built."""


def test_patched_every_cell_whose_server_runs_works_and_the_resolution_agrees():
    # Built for real with the serving-engine steps: every vLLM 0.12.0-0.34.0 (33 releases,
    # 0.15.0 and 0.15.1 from their official wheels) with every lmcache whose server runs,
    # patched, works (297 cells; the rows measured through vLLM's scheduler loop serve), and
    # where some candidate works the one picked works: the resolution agrees with the real
    # builds everywhere.
    served = [f"{v}|{lm}" for v in SUPPORTED for lm in SERVED]
    assert len(served) == 297
    assert {key: verdict(SHIPPED["cells"][key], "patched") for key in served} == dict.fromkeys(
        served, "works"
    )
    assert all(serving_steps(SHIPPED, v) for v in SUPPORTED)
    assert disagreements(SHIPPED) == []


def test_the_shipped_table_names_what_it_measured_and_no_machine_paths():
    text = (REPO_ROOT / "matrix" / "matrix.json").read_text()
    assert "/root/" not in text and "/home/" not in text and "/tmp/" not in text
    measured = SHIPPED["measured"]
    assert set(measured) == {"date", "commit", "vllm", "lmcache", "rows"}
    assert measured["vllm"] == sorted(SUPPORTED, key=Version)
    assert set(measured["rows"]) <= set(SUPPORTED)
    for stamps in measured["rows"].values():
        held = [lm for stamp in stamps for lm in stamp["lmcache"]]
        assert len(held) == len(set(held)) and set(held) <= set(measured["lmcache"])
        assert all(stamp["date"] <= measured["date"] for stamp in stamps)


def test_every_row_stamp_names_a_commit_of_this_history():
    """A row's stamp names the series its cells were measured with, and `pairs` prints it: a
    reader must be able to check that commit out (in a clone with its history; a shallow clone
    fails here). Rows stamped with commits since rewritten away were measured again
    (2026-12-03)."""
    stamps = {stamp["commit"] for runs in SHIPPED["measured"]["rows"].values() for stamp in runs}
    missing = [
        c[:12]
        for c in sorted(stamps)
        if not git_ok(["cat-file", "-e", f"{c}^{{commit}}"], REPO_ROOT)
    ]
    assert missing == []


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
        if version == "0.34.0":
            # vLLM 0.34.0 needs opentelemetry >= 1.45.1; every lmcache up to 0.5.6 pins it
            # <= 1.40.0, so no lmcache fits its pins (README, Which lmcache).
            assert cell["pin_conflicts"] == [
                "opentelemetry-api: vLLM >=1.45.1, lmcache <=1.40.0,>=1.20.0"
            ]
        else:
            assert not cell["pin_conflicts"], version
        # lmcache 0.4.5 and older have no server that runs on a CPU: the patched module imports
        # with them, and building the connector stops with the series' one error where it
        # does not know their adapter (measured without a server), else is not built here.
        assert verdict(cell, "patched") in ("works", "clear error", "not built"), version


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
        "measured": {"date": "2026-11-26", "commit": "old1, old2", "vllm": ["0.16.0", "0.21.0"],
                     "lmcache": ["0.4.5", "0.4.7"]},
    }  # fmt: skip
    new = {
        "cells": {"0.16.0|0.4.7": _cell(False, builtin)},
        "seconds": {"0.16.0": 3.0},
        "setup_seconds": {"0.16.0": 2.0},
        "measured": {"date": "2026-12-01", "commit": "new", "vllm": ["0.16.0"],
                     "lmcache": ["0.4.7"],
                     "rows": {"0.16.0": [{"date": "2026-12-01", "commit": "new",
                                          "lmcache": ["0.4.7"]}]}},
    }  # fmt: skip
    merged = merge([new], onto=earlier)
    assert merged["cells"]["0.16.0|0.4.7"]["patched"]["chosen"] == builtin
    assert merged["cells"]["0.21.0|0.4.7"] == earlier["cells"]["0.21.0|0.4.7"]
    assert merged["seconds"] == {"0.16.0": 3.0, "0.21.0": 8.0}
    assert merged["setup_seconds"] == {"0.16.0": 2.0, "0.21.0": 1.0}
    assert merged["servers"] == {"0.4.5": "no server"}
    assert merged["measured"] == {
        "date": "2026-12-01",
        "commit": "new, old1, old2",
        "vllm": ["0.16.0", "0.21.0"],
        "lmcache": ["0.4.5", "0.4.7"],
        "rows": {"0.16.0": [{"date": "2026-12-01", "commit": "new", "lmcache": ["0.4.7"]}]},
    }
    # pairs says when the cell it recommends was measured; one of a table merged from several
    # runs before cells kept their own stamps says no more than the table does.
    assert pairs_lines(pairs(merged, "0.21.0"))[-1] == "measured on or before 2026-12-01"
    # A later run of one more cell of 0.21.0 stamps that cell only.
    later = {
        "cells": {"0.21.0|0.4.5": _cell(True, builtin)},
        "measured": {"date": "2026-12-02", "commit": "later", "vllm": ["0.21.0"],
                     "lmcache": ["0.4.5"]},
    }  # fmt: skip
    again = merge([later], onto=merged)
    assert again["measured"]["rows"] == {
        "0.16.0": [{"date": "2026-12-01", "commit": "new", "lmcache": ["0.4.7"]}],
        "0.21.0": [{"date": "2026-12-02", "commit": "later", "lmcache": ["0.4.5"]}],
    }
    assert pairs_lines(pairs(again, "0.21.0"))[-1] == "measured on or before 2026-12-02"
    assert pairs(again, "0.21.0")["recommended"]["lmcache"] == "0.4.7"
    # Re-measured, a cell's stamp replaces the older one for that cell only.
    whole = {**later, "cells": {"0.21.0|0.4.7": _cell(True, builtin)},
             "measured": {**later["measured"], "date": "2026-12-03", "commit": "whole",
                          "lmcache": ["0.4.7"]}}  # fmt: skip
    final = merge([whole], onto=again)
    assert final["measured"]["rows"]["0.21.0"] == [
        {"date": "2026-12-03", "commit": "whole", "lmcache": ["0.4.7"]},
        {"date": "2026-12-02", "commit": "later", "lmcache": ["0.4.5"]},
    ]
    assert pairs_lines(pairs(final, "0.21.0"))[-1] == "measured 2026-12-03 (vllm-lmcache-mp whole)"
    # Every cell now has its own stamp: the table names only the commits its cells hold.
    assert again["measured"]["commit"] == "later, new, old1, old2"
    assert final["measured"]["commit"] == "whole, later, new"
    # A one-run table from before then stamps its rows with its own date and commit.
    older = {**new, "measured": {k: v for k, v in new["measured"].items() if k != "rows"}}
    assert merge([older], onto=earlier)["measured"] == merged["measured"]


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


def test_pairs_names_the_releases_the_series_refuses_apart_from_those_not_built():
    refused = _cell(False, BUILTIN)
    refused["patched"] = {
        **refused["patched"],
        "works": None,
        "error": "constructs scheduler: RuntimeError: vLLM 0.25.1+cpu's LMCacheMPConnector "
        "does not know the adapter API of lmcache 0.4.3: ...",
    }
    waits = _cell(False, BUILTIN)
    waits["patched"] = {**waits["patched"], "works": None}
    result = {
        "cells": {
            "0.25.1|0.4.3": refused,
            "0.25.1|0.4.5": waits,
            "0.25.1|0.4.6": _cell(True, BUILTIN),
        }
    }
    lines = pairs_lines(pairs(result, "0.25.1"))
    assert lines[:5] == [
        "vLLM 0.25.1: install lmcache==0.4.6 and apply the series (connector: builtin; pins fit)",
        "works patched with lmcache: 0.4.6 (builtin)",
        "works unpatched with lmcache: 0.4.6 (builtin)",
        "KV round trip on a CPU with that lmcache: not measured (vLLM's scheduler loop did not "
        "run in this cell)",
        "stops at start-up with the series' one error naming both versions and the fix (the "
        "builtin does not know that lmcache's adapter API; measured, no server needed): 0.4.3",
    ]
    assert lines[5] == "not built here (no server of that lmcache release runs on a CPU): 0.4.5"


def test_rows_not_yet_through_the_scheduler_loop_are_marked_and_explained():
    builtin = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector.X"
    result = {
        "cells": {
            "0.33.0|0.5.6": _cell(True, builtin, loop=False),
            "0.34.0|0.5.6": _cell(True, builtin),
        },
        "seconds": {},
    }
    assert summary(result) == (
        "| vLLM | works unpatched with lmcache | works patched with lmcache |\n"
        "|---|---|---|\n"
        "| 0.33.0 \N{DAGGER} | 0.5.6 (builtin) | 0.5.6 (builtin) |\n"
        "| 0.34.0 | 0.5.6 (builtin) | 0.5.6 (builtin) |\n"
        "\n"
        "\N{DAGGER} measured with the one-step probe (one hashed request through lookup, "
        "allocation and metadata, the worker driven once, the TP 2 geometry), not yet through "
        "vLLM's scheduler loop: check with `vllm-patches doctor --live` before deploying, or "
        "re-measure with `vllm-patches matrix --vllm VERSION --lmcache all`\n"
    )
    one_step = "measured with the one-step probe, not yet through vLLM's scheduler loop"
    assert any(one_step in line for line in pairs_lines(pairs(result, "0.33.0")))
    assert not any(one_step in line for line in pairs_lines(pairs(result, "0.34.0")))


SERVED_HIT = (
    "serves (487 steps, 19 preempted, 6 delayed frees; round trip: 2 requests of the second "
    "wave loaded 512 to 512 of 544 prompt tokens, every one equal to what the first wave wrote)"
)
SERVED_NO_HIT = (
    "serves (526 steps, 3 preempted, 6 delayed frees; round trip: no hit: id-200 of the second "
    "wave got nothing from the connector)"
)


def _looped(chosen: str, texts: dict[str, str]) -> dict:
    cell = _cell(True, chosen)
    cell["patched"] = {**cell["patched"], "candidates": texts}
    return cell


def test_a_cpu_round_trip_is_judged_per_lmcache_release_from_every_loop_that_served():
    main = "lmcache.integration.vllm.lmcache_mp_connector.LMCacheMPConnector"
    result = {
        "cells": {
            "0.25.1|0.5.4": _looped(main, {"lmcache main": SERVED_NO_HIT}),
            "0.34.0|0.5.4": _looped(BUILTIN, {"builtin": SERVED_NO_HIT}),
            "0.25.1|0.5.5": _looped(main, {"lmcache main": SERVED_HIT}),
            "0.34.0|0.5.5": _looped(BUILTIN, {"builtin": SERVED_NO_HIT}),
        },
        "seconds": {},
    }
    assert cpu_round_trips(result) == {
        "0.5.4": "not possible on a CPU: the second wave got no hit from any connector that "
        "served (builtin, lmcache main) on any vLLM measured (0.25.1\N{EN DASH}0.34.0, "
        "2 releases)",
        "0.5.5": "possible: equal bytes loaded on vLLM 0.25.1",
    }
    assert disagreements(result) == []
    assert pairs(result, "0.25.1")["round_trip"] == (
        "equal bytes loaded, measured through vLLM's scheduler loop"
    )
    assert cell_round_trip(result, "0.34.0", "0.5.4") == cpu_round_trips(result)["0.5.4"]
    assert "- lmcache 0.5.4: not possible on a CPU: " in summary(result)


def test_a_chosen_class_without_a_hit_where_another_candidate_hit_is_a_disagreement():
    result = {
        "cells": {
            "0.21.0|0.5.5": _looped(BUILTIN, {"builtin": SERVED_NO_HIT, "_0201": SERVED_HIT}),
        },
        "seconds": {},
    }
    assert disagreements(result) == [
        "0.21.0|0.5.5: patched serves with no hit, measured best a round trip"
    ]


def test_every_loop_the_shipped_table_holds_says_whether_its_round_trip_hit():
    """The reader and the probe's words agree: a loop that served names a hit or no hit."""
    served = [
        text
        for cell in SHIPPED["cells"].values()
        for label in ("unpatched", "patched")
        for text in cell.get(label, {}).get("candidates", {}).values()
        if text.startswith("serves (")
    ]
    assert served
    assert [t for t in served if round_trip(t) is None] == []
