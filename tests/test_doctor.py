"""doctor and matrix on a real vLLM 0.21.0 with real lmcache releases laid over it."""

from __future__ import annotations

import json
import re

import pytest
from conftest import lmcache_unknown_to_the_builtin
from vllm_patches.diagnosis.doctor import Diagnosis, LiveDiagnosis, diagnose, diagnose_layers
from vllm_patches.diagnosis.matrix import (
    disagreements,
    merge,
    run_matrix,
    shard_of,
    verdict,
)
from vllm_patches.diagnosis.matrix.verdicts import shipped
from vllm_patches.errors import PatchToolError
from vllm_patches.sources.venvs import lmcache_layer, vllm_env
from vllm_patches.targets.apply import apply
from vllm_patches.targets.find import installed_vllm

FROZEN = "lmcache.integration.vllm.lmcache_mp_connector_{}.LMCacheMPConnector"
VLLM_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector"
BUILTIN = f"{VLLM_MODULE}.LMCacheMPConnectorUpstream"


@pytest.fixture(scope="module")
def python():
    return vllm_env("0.21.0", "0.5.3")


WORKS_PATCHED_0_21_0 = (
    "0.4.6 (lmcache main), 0.4.7\N{EN DASH}0.5.1 (builtin), 0.5.2\N{EN DASH}0.5.5 (_0201), "
    "0.5.6 (builtin)"
)
"""What the pairing table measured working on vLLM 0.21.0 patched, written out (README)."""


def _doctor(cli, monkeypatch, python, lmcache, layer=None):
    monkeypatch.setenv("PYTHONPATH", str(layer or lmcache_layer(python, lmcache)))
    code, out, _ = cli("doctor", "--python", python, "--json")
    return code, json.loads(out)


@pytest.mark.slow
def test_doctor_unpatched_reads_the_builtins_typeerror_and_advises_the_series(
    python, cli, monkeypatch, tmp_path
):
    """Nothing static tells whether vLLM 0.21.0's own class starts with lmcache 0.5.0; the
    pairing table measured this pair (TypeError), and the series' builtin knows its adapter."""
    code, data = _doctor(cli, monkeypatch, python, "0.5.0")
    assert code == 2 and not data["ok"] and data["patched"] is False
    assert data["chosen_builds"] is None and data["chosen_error"] == ""
    assert data["resolution"]["class"] == BUILTIN and data["resolution"]["error"] == ""
    routes = data["module_path_route"]
    assert routes["lmcache.integration.vllm.lmcache_mp_connector_0180"] == FROZEN.format("0180")
    code, out, _ = cli("doctor", "--python", python)
    assert code == 2
    assert (
        "verdict: will fail when the engine starts, measured with the serving-engine steps "
        "(pairing table): constructs scheduler: TypeError: ParallelStrategy.__init__() takes 7 "
        "positional arguments but 8 were given\n"
    ) in out
    assert out.endswith(
        f"fix: apply the series (vllm-patches apply --python PY): it picks {BUILTIN}\n"
    )
    # A pair the table never measured: doctor says it cannot tell (exit 3), not OK.
    layer = lmcache_unknown_to_the_builtin(python, tmp_path)
    code, data = _doctor(cli, monkeypatch, python, "", layer)
    assert code == 3 and data["lmcache"] == "0.9.0" and data["chosen_builds"] is None
    assert data["resolution"]["error"].startswith("RuntimeError: vLLM 0.21.0+cpu's ")


@pytest.mark.slow
def test_doctor_asks_the_series_where_lmcache_has_no_adapter_it_speaks(cli):
    """vLLM 0.12.0 with lmcache 0.3.9.post2, which has no multi-process adapter: the series'
    builtin would stop with its one error (asked of the overlay, vLLM being unpatched). What
    vLLM's own class does with it nothing measured (its server does not run here): exit 3."""
    python = vllm_env("0.12.0", "0.3.9.post2")
    code, out, _ = cli("doctor", "--python", python, "--json")
    data = json.loads(out)
    assert code == 3 and data["patched"] is False and data["chosen_builds"] is None
    assert data["resolution"]["class"] == BUILTIN
    assert data["resolution"]["error"].startswith(
        "RuntimeError: vLLM 0.12.0+cpu's LMCacheMPConnector does not know the adapter API of "
        "lmcache 0.3.9.post2: its multi-process adapter does not import (No module named "
    )


@pytest.mark.slow
def test_doctor_patched(python, cli, monkeypatch, tmp_path):
    site = installed_vllm(str(python))
    apply(site)
    try:
        # lmcache 0.5.0 and 0.5.6: lmcache's main connector needs a newer vLLM, the series
        # uses no copy with them; the builtin, which knows their adapters by name, builds.
        for lmcache in ("0.5.0", "0.5.6"):
            code, data = _doctor(cli, monkeypatch, python, lmcache)
            assert code == 0 and data["ok"] and data["patched"] is True, lmcache
            assert data["chosen"] == BUILTIN and data["chosen_builds"] is True
            assert data["builtin"]["builds"] is True
            assert data["resolution"] == {
                "class": BUILTIN,
                "reason": data["resolution"]["reason"],
                "error": "",
            }
            assert data["resolution"]["reason"].startswith(
                "lmcache.integration.vllm.lmcache_mp_connector: ImportError: "
            )
            # Nothing static tells whether lmcache's own connectors build.
            assert {c["builds"] for c in data["candidates"]} == {None}
        code, data = _doctor(cli, monkeypatch, python, "0.5.3")
        assert code == 0 and data["ok"] and data["chosen"] == FROZEN.format("0201")
        # An lmcache whose adapter the builtin does not know: its one error, before it connects.
        layer = lmcache_unknown_to_the_builtin(python, tmp_path)
        code, data = _doctor(cli, monkeypatch, python, "", layer)
        error = (
            "RuntimeError: vLLM 0.21.0+cpu's LMCacheMPConnector does not know the adapter API of "
            "lmcache 0.9.0: its ParallelStrategy requires cp_rank. Install an lmcache release "
        )
        assert code == 2 and data["chosen"] == BUILTIN and data["chosen_builds"] is False
        assert data["chosen_error"].startswith(error)
        assert data["builtin"]["builds"] is False and data["builtin"]["error"].startswith(error)
        code, out, _ = cli("doctor", "--python", python)
        assert code == 2 and f"verdict: will fail when the engine starts: {error}" in out
        # The advice comes from the pairing table shipped in matrix/matrix.json.
        assert f"fix: with the series applied, install lmcache {WORKS_PATCHED_0_21_0}\n" in out
        assert out.endswith(
            "fix: or run vllm-patches doctor --live: it builds each of lmcache's connectors "
            "here, and says how to name one that works\n"
        )
    finally:
        apply(site, revert=True)


REFUSAL_0_4_3 = (
    "RuntimeError: vLLM {}+cpu's LMCacheMPConnector does not know the adapter API of lmcache "
    "0.4.3: its multi-process adapter does not import (cannot import name "
    "'LMCacheEngineMetadata' from 'lmcache.config'). Install an lmcache release whose adapter "
    "this vLLM knows (0.4.6 to 0.5.6 were checked), or set kv_connector_module_path to a "
    "connector made for lmcache 0.4.3."
)


@pytest.mark.slow
def test_patched_with_an_lmcache_before_its_adapter_the_module_imports_and_construction_says_so(
    python, cli, monkeypatch
):
    """vLLM 0.21.0 with lmcache 0.4.3: neither lmcache's adapter nor vLLM's lmcache_integration
    imports. Unpatched, vLLM's connector module does not import; patched, it does, and building
    the class stops with the one error naming both versions and the fix."""
    code, data = _doctor(cli, monkeypatch, python, "0.4.3")
    assert code == 2 and not data["ok"]
    assert data["import_error"] == (
        "ImportError: cannot import name 'LMCacheEngineMetadata' from 'lmcache.config'"
    )
    site = installed_vllm(str(python))
    apply(site)
    try:
        code, data = _doctor(cli, monkeypatch, python, "0.4.3")
        assert code == 2 and data["chosen"] == BUILTIN and data["chosen_builds"] is False
        assert data["chosen_error"] == REFUSAL_0_4_3.format("0.21.0")
    finally:
        apply(site, revert=True)


@pytest.mark.slow
@pytest.mark.parametrize("release", ["0.21.0", "0.25.1"])
def test_where_no_lmcache_server_runs_the_table_measures_the_series_refusal(release):
    """No server of lmcache 0.4.3 runs on a CPU, yet the cell is measured: unpatched, vLLM's
    module does not import; patched, it imports, and constructing the scheduler with nothing
    listening stops with the one error naming both versions and the fix (the series checks
    lmcache's adapter API before it connects). The shipped table says the same."""
    cell = run_matrix([release], ["0.4.3"])["cells"][f"{release}|0.4.3"]
    assert verdict(cell, "unpatched") == "does not import"
    assert cell["unpatched"]["error"] == (
        "ImportError: cannot import name 'LMCacheEngineMetadata' from 'lmcache.config'"
    )
    assert verdict(cell, "patched") == "clear error" and cell["patched"]["chosen"] == BUILTIN
    # The table keeps the first 300 characters of an error.
    refusal = REFUSAL_0_4_3.format(release)
    assert cell["patched"]["error"] == f"constructs scheduler: {refusal}"[:300]
    assert (
        cell["patched"]["candidates"]["builtin"]
        == (
            "imports (not built: no server; constructed with nothing listening, the scheduler "
            f"raises {refusal})"
        )[:300]
    )
    table = shipped()["cells"][f"{release}|0.4.3"]
    assert (verdict(table, "unpatched"), verdict(table, "patched")) == (
        "does not import",
        "clear error",
    )


@pytest.mark.slow
def test_two_shards_merged_equal_the_unsharded_run(python):
    grid = (["0.21.0"], ["0.5.3", "0.5.6"])
    whole = run_matrix(*grid)
    parts = [run_matrix(*grid, shard=f"{i}/2") for i in (1, 2)]

    # How many steps vLLM's scheduler loop took, and at which step a store or a raise came,
    # vary with the timing of lmcache's asynchronous lookups; everything else is the same.
    def steady(cells: dict) -> str:
        return re.sub(r"\d+ (steps|preempted|delayed frees)|step \d+", r"N \1", json.dumps(cells))

    assert steady(merge(parts)["cells"]) == steady(merge([whole])["cells"])
    # The shipped table's claims for these cells are what this build measures.
    table = shipped()["cells"]
    for key, cell in whole["cells"].items():
        for side in ("unpatched", "patched"):
            measured = (verdict(cell, side), cell[side]["chosen"])
            assert measured == (verdict(table[key], side), table[key][side]["chosen"]), key
    cell = whole["cells"]["0.21.0|0.5.3"]
    assert verdict(cell, "unpatched") == "fails" and verdict(cell, "patched") == "works"
    assert cell["patched"]["chosen"] == FROZEN.format("0201")
    assert cell["patched"]["candidates"]["_0180"].startswith(
        "fails at: scheduler constructs (constructs scheduler: ZMQError: Invalid argument "
        "(addr='t'); and the wrong geometry: rank 1 of TP 2, mla on: "
    )
    assert cell["patched"]["steps"]["block hashes"] == 32
    # lmcache 0.5.6: its main connector needs a newer vLLM and it ships no copies; the
    # builtin speaks its adapter API by name.
    assert verdict(whole["cells"]["0.21.0|0.5.6"], "patched") == "works"
    assert whole["cells"]["0.21.0|0.5.6"]["patched"]["chosen"] == BUILTIN
    assert disagreements(whole) == []


def test_shards_deal_every_cell_once():
    cells = [(v, lm) for v in "abc" for lm in "xyz"]
    dealt = [c for i in (1, 2, 3, 4) for c in shard_of(cells, f"{i}/4")]
    assert sorted(dealt) == sorted(cells)
    # Contiguous blocks: a vLLM release's cells stay on one shard (one venv build).
    assert shard_of(cells, "1/3") == [("a", "x"), ("a", "y"), ("a", "z")]
    with pytest.raises(PatchToolError, match="give i/n with 1 <= i <= n"):
        shard_of(cells, "5/4")


@pytest.mark.slow
def test_forked_diagnoses_equal_fresh_processes(python, tmp_path):
    layers = [lmcache_layer(python, lm) for lm in ("0.5.0", "0.5.6")]
    # A layer whose lmcache kills its process: that cell fails, the next is still measured.
    dying = tmp_path / "dying"
    (dying / "lmcache").mkdir(parents=True)
    (dying / "lmcache" / "__init__.py").write_text("import os\nos._exit(3)\n")
    found = diagnose_layers(python, [layers[0], dying, layers[1]])
    assert [d.data for d in (found[0], found[2])] == [diagnose(python, [p]).data for p in layers]
    assert found[0].data["lmcache"] == "0.5.0" and found[2].data["lmcache"] == "0.5.6"
    assert not found[1].ok
    assert found[1].data["import_error"] == "the probe failed: exit code 3"


@pytest.mark.slow
def test_doctor_warns_when_vllms_pins_are_not_met(python, tmp_path):
    layer = lmcache_layer(python, "0.5.0")
    assert diagnose(python, [layer]).data["vllm_unmet"] == []
    # What installing lmcache after vLLM can do: a dependency moved out of vLLM's range.
    fake = tmp_path / "transformers-4.0.0.dist-info"
    fake.mkdir()
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 4.0.0\n")
    diagnosis = diagnose(python, [layer, tmp_path])
    assert diagnosis.data["vllm_unmet"] == [
        "transformers 4.0.0 is installed, vllm needs !=5.0.*,!=5.1.*,!=5.2.*,!=5.3.*,!=5.4.*,"
        "!=5.5.0,>=4.56.0"
    ]
    assert "warning: transformers 4.0.0 is installed, vllm needs " in "\n".join(diagnosis.lines())


def _works(module: str) -> dict:
    return {"module": module, "constructs_scheduler": True, "verdict": "works"}


@pytest.mark.parametrize(
    ("vllm", "patched", "how"),
    [
        ("0.17.1+cpu", True, "name it"),
        ("0.21.0+cpu", False, "name it"),  # vLLM honours kv_connector_module_path from 0.20.0
        (
            "0.17.1+cpu",
            False,
            "apply the series (vllm-patches apply --python PY; vLLM 0.17.1 ignores "
            "kv_connector_module_path without it), then name it",
        ),
    ],
)
def test_doctor_live_names_each_lmcache_connector_that_works_in_the_probes_order(
    vllm, patched, how
):
    """One fix per lmcache connector that worked when built for real, in the order the probe
    reported them, each named with kv_connector_module_path as that vLLM takes it; none for
    one that failed, nor for vLLM's own class."""
    module = "lmcache.integration.vllm.lmcache_mp_connector{}"
    # Deliberately neither sorted nor reverse-sorted: only keeping the given order passes.
    order = ("_0180", "_0170", "_0201")
    data = {
        "vllm": vllm,
        "lmcache": "0.5.3",
        "patched": patched,
        "candidates": [
            _works(module.format("_0180")),
            {**_works(module.format("")), "verdict": "fails"},
            _works(module.format("_0170")),
            _works(module.format("_0201")),
            {**_works(VLLM_MODULE), "builtin": True},
        ],
        "chosen": BUILTIN,
        "chosen_build": {"constructs_scheduler": False, "verdict": "fails", "error": "x"},
    }
    assert LiveDiagnosis(data).fixes() == [
        f"{module.format(s)} works here: {how} with --kv-transfer-config "
        f'\'{{"kv_connector":"LMCacheMPConnector","kv_connector_module_path":"{module.format(s)}",'
        "...}'"
        for s in order
    ]


def test_doctor_names_the_table_and_doctor_live_where_the_series_builtin_does_not_build():
    error = "RuntimeError: vLLM 0.21.0+cpu's LMCacheMPConnector does not know the adapter API"
    data = {
        "vllm": "0.21.0+cpu",
        "lmcache": "0.9.0",
        "patched": True,
        "candidates": [],
        "resolution": {"class": BUILTIN, "reason": "r", "error": error},
        "chosen": BUILTIN,
        "chosen_builds": False,
        "chosen_error": error,
    }
    diagnosis = Diagnosis(data)
    assert not diagnosis.ok
    assert diagnosis.lines()[-3:] == [
        f"verdict: will fail when the engine starts: {error}",
        "fix: with the series applied, install lmcache " + WORKS_PATCHED_0_21_0,
        "fix: or run vllm-patches doctor --live: it builds each of lmcache's connectors here, "
        "and says how to name one that works",
    ]
    # Unpatched, the same lmcache: the series would not help, nothing static tells.
    unpatched = {**data, "patched": False, "chosen": UNPATCHED, "chosen_builds": None}
    diagnosis = Diagnosis({**unpatched, "chosen_error": ""})
    assert not diagnosis.ok
    assert diagnosis.lines()[-3:] == [
        "verdict: not checked: nothing static tells whether vLLM 0.21.0+cpu's own connector "
        "starts with lmcache 0.9.0, and the pairing table has not measured them together",
        "fix: check it here with vllm-patches doctor --live",
        "fix: or with the series applied, install lmcache " + WORKS_PATCHED_0_21_0,
    ]
    # ... and where the series' choice passes, applying it is the fix.
    passes = {**unpatched, "resolution": {"class": BUILTIN, "reason": "r", "error": ""}}
    assert Diagnosis(passes).lines()[-1] == (
        f"fix: or apply the series (vllm-patches apply --python PY): it picks {BUILTIN}"
    )


UNPATCHED = f"{VLLM_MODULE}.LMCacheMPConnector"


def _static(
    vllm: str, lmcache: str, *, patched: bool, chosen: str, builds: bool | None = True
) -> Diagnosis:
    """What the static probe says where the chosen class does not fail its static check."""
    return Diagnosis(
        {
            "vllm": f"{vllm}+cpu",
            "lmcache": lmcache,
            "vllm_unmet": [],
            "candidates": [],
            "patched": patched,
            "chosen": chosen,
            "chosen_builds": builds,
            "chosen_error": "",
        }
    )


def test_static_doctor_fails_where_the_table_measured_a_hang_it_cannot_see():
    """vLLM 0.16.0's own class with lmcache 0.4.6, which nothing static can check; the pairing
    table, built with hashed requests, measured that its first lookup never returns."""
    diagnosis = _static("0.16.0", "0.4.6", patched=False, chosen=UNPATCHED, builds=None)
    assert diagnosis.measured["verdict"] == "hangs"
    assert not diagnosis.ok
    lines = diagnosis.lines()
    assert lines[-3].startswith(
        "verdict: it starts, but measured with the serving-engine steps (pairing table) the "
        "engine would hang on its first requests: scheduler round trip: hangs: scheduler "
        "get_num_new_matched_tokens did not return in 30 s; blocked in "
    )
    assert lines[-2].startswith("fix: with the series applied, install lmcache 0.4.6 (lmcache main")
    assert lines[-1] == "fix: or check it here with vllm-patches doctor --live"


def test_static_doctor_fails_where_the_table_measured_the_wrong_geometry():
    # vLLM 0.19.1's own class with lmcache 0.4.7: it constructs and answers, and with MLA
    # rank 1 of TP 2 also writes (measured); nothing static can see that.
    diagnosis = _static("0.19.1", "0.4.7", patched=False, chosen=UNPATCHED, builds=None)
    assert not diagnosis.ok
    assert (
        "(pairing table) a tensor-parallel worker would read and write the wrong KV pieces: "
        "rank 1 of TP 2, mla on: sent {'kv_world_size': 1, 'kv_worker_id': 0, 'is_kv_writer': "
        "True}"
    ) in diagnosis.lines()[-3]


def test_static_doctor_says_not_checked_where_the_table_chose_another_class():
    # Here a class the table did not measure for this pairing (lmcache's main connector, as
    # a vLLM whose resolution picks it would): the table's verdict does not apply, and that
    # it constructs here does not tell whether it serves.
    chosen = "lmcache.integration.vllm.lmcache_mp_connector.LMCacheMPConnector"
    diagnosis = _static("0.16.0", "0.4.6", patched=False, chosen=chosen)
    assert diagnosis.measured == {}
    assert not diagnosis.ok and not diagnosis.checked
    assert diagnosis.lines()[-3:] == [
        "verdict: not checked: lmcache.integration.vllm.lmcache_mp_connector.LMCacheMPConnector "
        "constructs here, but nothing static tells whether it serves with lmcache 0.4.6, and "
        "the pairing table has not measured them together",
        "fix: check it here with vllm-patches doctor --live",
        "fix: or with the series applied, install lmcache 0.4.6 (lmcache main; pins "
        "conflict: transformers), 0.4.7\N{EN DASH}0.5.6 (builtin; pins conflict: transformers)",
    ]


def test_static_doctor_reads_a_failure_the_table_measured_where_nothing_static_tells():
    diagnosis = _static("0.21.0", "0.5.0", patched=False, chosen=UNPATCHED, builds=None)
    assert diagnosis.measured["verdict"] == "fails" and not diagnosis.ok
    assert diagnosis.lines()[-3] == (
        "verdict: will fail when the engine starts, measured with the serving-engine steps "
        "(pairing table): constructs scheduler: TypeError: ParallelStrategy.__init__() takes 7 "
        "positional arguments but 8 were given"
    )
    # ... and one it measured serving, through vLLM's scheduler loop.
    diagnosis = _static("0.21.0", "0.4.6", patched=False, chosen=UNPATCHED, builds=None)
    assert diagnosis.measured["verdict"] == "serves" and diagnosis.ok


def _served_without_a_hit(lmcache: str) -> dict:
    loop = {
        "verdict": "serves",
        "steps": 526,
        "preemptions": 3,
        "delayed_frees": 6,
        "hit": False,
        "round_trip": "no hit: id-200 of the second wave got nothing from the connector",
    }
    chosen = {**_works(BUILTIN), "verdict": "serves", "engine_loop": loop, "builtin": True}
    return {
        "vllm": "0.34.0+cpu",
        "lmcache": lmcache,
        "patched": True,
        "server": "tcp://127.0.0.1:1",
        "candidates": [chosen],
        "chosen": BUILTIN,
        "chosen_build": chosen,
    }


def test_doctor_live_without_a_hit_passes_only_where_the_table_found_no_round_trip_possible(
    monkeypatch,
):
    """The loop served, but its second wave got nothing back: fine with an lmcache release
    whose CPU round trip the table measured as not possible (said, with why); a failure with
    one the table measured loading equal bytes."""
    served = "serves (526 steps, 3 preempted, 6 delayed frees; round trip: {})"
    table = {
        "cells": {
            "0.25.1|0.5.4": {
                "patched": {"candidates": {"lmcache main": served.format("no hit: id-200")}}
            },
            "0.25.1|0.5.6": {
                "patched": {
                    "candidates": {
                        "lmcache main": served.format(
                            "2 requests of the second wave loaded 512 to 512 of 544 prompt "
                            "tokens, every one equal to what the first wave wrote"
                        )
                    }
                }
            },
        }
    }
    monkeypatch.setattr("vllm_patches.diagnosis.doctor.shipped", lambda: table)
    impossible = LiveDiagnosis(_served_without_a_hit("0.5.4"))
    assert impossible.ok
    assert (
        "KV round trip on a CPU (pairing table): not possible on a CPU: the second wave got no "
        "hit from any connector that served (lmcache main) on any vLLM measured "
        "(0.25.1)"
    ) in impossible.lines()
    possible = LiveDiagnosis(_served_without_a_hit("0.5.6"))
    assert not possible.ok
    assert possible.lines()[-2].startswith(
        "verdict: the engine would serve without its cache: vLLM's scheduler loop serves "
        "(526 steps, 3 preempted, 6 delayed frees; round trip: no hit: id-200 of the second "
        "wave got nothing from the connector), where the pairing table loaded equal bytes with "
        "lmcache 0.5.6"
    )
