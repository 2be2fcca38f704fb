"""The pairing table shipped in matrix/: full size, in step with the README, read right."""

from __future__ import annotations

import json

from conftest import SUPPORTED
from packaging.version import Version
from vllm_patches.matrix import FIRST_LMCACHE, merge, summary
from vllm_patches.series import REPO_ROOT
from vllm_patches.sources import final_releases

SHIPPED = json.loads((REPO_ROOT / "matrix" / "matrix.json").read_text())
FROZEN = "lmcache.integration.vllm.lmcache_mp_connector_{}.LMCacheMPConnector"


def _cell(ok: bool, chosen: str) -> dict:
    info = {"ok": ok, "chosen": chosen, "error": "", "candidates": {}, "module_path_route": {}}
    return {"unpatched": info, "patched": info}


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


def test_the_shipped_table_says_what_the_issue_measured():
    cells = SHIPPED["cells"]
    assert cells["0.21.0|0.5.0"]["patched"]["chosen"] == FROZEN.format("0180")
    assert not cells["0.21.0|0.5.0"]["unpatched"]["ok"]
    assert not cells["0.21.0|0.5.6"]["patched"]["ok"]
    assert "no connector can be built" in cells["0.21.0|0.5.6"]["patched"]["error"]


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
                "0.21.0|0.4.2": _cell(True, FROZEN.format("0180")),
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
    # A release that fails breaks a run of releases that start.
    assert rows == [
        "| 0.9.0 | 0.4.2 (builtin) | 0.4.2 (builtin) |",
        "| 0.21.0 | 0.3.9.post2\N{EN DASH}0.3.10 (_0180), 0.4.2 (_0180) "
        "| 0.3.9.post2\N{EN DASH}0.3.10 (_0180), 0.4.2 (_0180) |",
    ]
