"""doctor and matrix on a real vLLM 0.21.0 with real lmcache releases laid over it."""

from __future__ import annotations

import json

import pytest
from vllm_patches.diagnosis.doctor import Diagnosis, diagnose, diagnose_layers
from vllm_patches.diagnosis.matrix import (
    disagreements,
    merge,
    run_matrix,
    shard_of,
    shipped,
    starts_with,
    verdict,
)
from vllm_patches.errors import PatchToolError
from vllm_patches.sources.venvs import lmcache_layer, vllm_env
from vllm_patches.targets.apply import apply
from vllm_patches.targets.find import installed_vllm

FROZEN = "lmcache.integration.vllm.lmcache_mp_connector_{}.LMCacheMPConnector"


@pytest.fixture(scope="module")
def python():
    return vllm_env("0.21.0", "0.5.3")


def _doctor(cli, monkeypatch, python, lmcache):
    monkeypatch.setenv("PYTHONPATH", str(lmcache_layer(python, lmcache)))
    code, out, _ = cli("doctor", "--python", python, "--json")
    return code, json.loads(out)


@pytest.mark.slow
def test_doctor_unpatched_predicts_the_builtins_typeerror(python, cli, monkeypatch):
    code, data = _doctor(cli, monkeypatch, python, "0.5.0")
    assert code == 2 and not data["ok"] and data["patched"] is False
    assert "ParallelStrategy() at line" in data["chosen_error"]
    routes = data["module_path_route"]
    assert routes["lmcache.integration.vllm.lmcache_mp_connector_0180"] == FROZEN.format("0180")


@pytest.mark.slow
def test_doctor_patched(python, cli, monkeypatch, capsys):
    site = installed_vllm(str(python))
    apply(site)
    try:
        # lmcache 0.5.0: _0180 passes a URL string where server_urls: list[str] is wanted
        # (ZMQError when built for real), _0201 and the builtin have ParallelStrategy's old
        # arity: nothing can be built, and the static check now sees all three.
        code, data = _doctor(cli, monkeypatch, python, "0.5.0")
        assert code == 2 and data["chosen"].endswith("LMCacheMPConnectorUnavailable")
        builds = {c["module"].rsplit("_", 1)[-1]: c["builds"] for c in data["candidates"]}
        assert builds == {"connector": False, "0201": False, "0180": False}
        errors = {c["module"].rsplit("_", 1)[-1]: c["error"] for c in data["candidates"]}
        assert errors["0180"].endswith("server_urls takes list[str], not a str")
        code, data = _doctor(cli, monkeypatch, python, "0.5.3")
        assert code == 0 and data["ok"] and data["chosen"] == FROZEN.format("0201")
        code, data = _doctor(cli, monkeypatch, python, "0.5.6")
        assert code == 2 and data["chosen"].endswith("LMCacheMPConnectorUnavailable")
        assert (
            "no connector can be built with vLLM 0.21.0 and lmcache 0.5.6" in data["chosen_error"]
        )
        code, out, _ = cli("doctor", "--python", python)
        assert code == 2 and "verdict: will fail when the engine starts: " in out
        # The advice comes from the pairing table shipped in matrix/matrix.json.
        working = starts_with(shipped(), "0.21.0", "patched")
        assert f"fix: with the series applied, install lmcache {working}\n" in out
        assert "0.5.2\N{EN DASH}0.5.5 (_0201)" in working  # 0.5.3 among them
    finally:
        apply(site, revert=True)


@pytest.mark.slow
def test_two_shards_merged_equal_the_unsharded_run(python):
    grid = (["0.21.0"], ["0.5.3", "0.5.6"])
    whole = run_matrix(*grid)
    parts = [run_matrix(*grid, shard=f"{i}/2") for i in (1, 2)]
    assert merge(parts)["cells"] == merge([whole])["cells"]
    cell = whole["cells"]["0.21.0|0.5.3"]
    assert verdict(cell, "unpatched") == "fails" and verdict(cell, "patched") == "works"
    assert cell["patched"]["chosen"] == FROZEN.format("0201")
    assert cell["patched"]["candidates"]["_0180"].startswith(
        "fails at: scheduler constructs (constructs scheduler: ZMQError: Invalid argument "
        "(addr='t'); and the wrong geometry: rank 1 of TP 2, mla on: "
    )
    assert cell["patched"]["steps"]["block hashes"] == 32
    assert verdict(whole["cells"]["0.21.0|0.5.6"], "patched") == "clear error"
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


def test_doctor_advises_each_copy_that_builds_newer_ones_too_in_the_probes_order():
    """One fix per candidate that builds, none for one that does not, in the order the probe
    reported them (the probe lists them as the series tries them). A copy made for a newer
    vLLM (0180, 0201 on 0.17.1) is tried last by the series (patch 0006), not never, so it is
    advised too."""

    def candidate(suffix: str, *, builds: bool = True) -> dict:
        module = f"lmcache.integration.vllm.lmcache_mp_connector_{suffix}"
        return {"module": module, "imports": True, "subclass": True, "builds": builds, "error": ""}

    # Deliberately neither sorted nor reverse-sorted: only keeping the given order passes.
    order = ("0180", "0170", "0201")
    data = {
        "vllm": "0.17.1+cpu",
        "lmcache": "0.5.3",
        "patched": True,
        "candidates": [
            candidate("0180"),
            candidate("main", builds=False),
            *map(candidate, order[1:]),
        ],
        "chosen_builds": False,
        "chosen_error": "LMCacheMPConnector: no connector can be built",
    }
    assert Diagnosis(data).fixes() == [
        f"set LMCACHE_MP_CONNECTOR_MODULE={candidate(s)['module']}" for s in order
    ]


BUILTIN_CLASS = (
    "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector.LMCacheMPConnector"
)


def _static(vllm: str, lmcache: str, *, patched: bool, chosen: str) -> Diagnosis:
    """What the static probe says where the chosen class passes its construction check."""
    return Diagnosis(
        {
            "vllm": f"{vllm}+cpu",
            "lmcache": lmcache,
            "vllm_unmet": [],
            "candidates": [],
            "patched": patched,
            "chosen": chosen,
            "chosen_builds": True,
            "chosen_error": "",
        }
    )


def test_static_doctor_fails_where_the_table_measured_a_hang_it_cannot_see():
    """vLLM 0.16.0's builtin with lmcache 0.4.6 constructs, so the static check passes; the
    pairing table, built with hashed requests, measured that its first lookup never returns."""
    diagnosis = _static("0.16.0", "0.4.6", patched=False, chosen=BUILTIN_CLASS)
    assert diagnosis.measured["verdict"] == "hangs"
    assert not diagnosis.ok
    lines = diagnosis.lines()
    assert lines[-3].startswith(
        "verdict: it starts, but measured with the serving-engine steps (pairing table) an "
        "engine hangs on its first request: scheduler round trip: hangs: scheduler "
        "get_num_new_matched_tokens did not return in 30 s; blocked in "
    )
    assert lines[-2].startswith("fix: with the series applied, install lmcache 0.4.6 (lmcache main")
    assert lines[-1] == "fix: or check it here with vllm-patches doctor --live"


def test_static_doctor_fails_where_the_table_measured_the_wrong_geometry():
    chosen = "lmcache.integration.vllm.lmcache_mp_connector_0180.LMCacheMPConnector"
    diagnosis = _static("0.21.0", "0.4.7", patched=True, chosen=chosen)
    assert not diagnosis.ok
    assert (
        "(pairing table) a tensor-parallel worker reads and writes the wrong KV pieces: "
        "rank 1 of TP 2, mla on: sent {'kv_world_size': 1, 'kv_worker_id': 0, 'is_kv_writer': "
        "True}"
    ) in diagnosis.lines()[-3]


def test_static_doctor_trusts_its_own_check_where_the_table_chose_another_class():
    # Here LMCACHE_MP_CONNECTOR_MODULE (say) picked lmcache's main connector: not what the
    # table measured for this pairing, so the table's verdict does not apply.
    chosen = "lmcache.integration.vllm.lmcache_mp_connector.LMCacheMPConnector"
    diagnosis = _static("0.16.0", "0.4.6", patched=False, chosen=chosen)
    assert diagnosis.measured == {}
    assert diagnosis.ok and diagnosis.lines()[-1] == "verdict: OK"
