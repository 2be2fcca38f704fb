"""What a serving engine asks of a connector, on real installs against real LMCache servers.

vLLM from its sdist, lmcache releases laid over it, each release's own server on 127.0.0.1:
requests carry real block hashes, the worker is driven with the scheduler's metadata as far as
a CPU allows, the geometry of rank 1 in tensor-parallel size 2 is checked, and a step that
does not return is the verdict ``hangs``.
"""

from __future__ import annotations

import json
import shutil

import pytest
from vllm_patches.diagnosis.doctor import live_check
from vllm_patches.diagnosis.live import Layer, build_layers
from vllm_patches.sources.venvs import lmcache_layer, vllm_env

pytestmark = [pytest.mark.slow, pytest.mark.network]
MAIN = "lmcache.integration.vllm.lmcache_mp_connector"
BUILTIN = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector"
HASHES = 32
"""A 512-token prompt in blocks of 16."""
NO_KV_CACHE = (
    "not run here: stopped: no KV cache is registered (RuntimeError: Transfer context is not "
    "initialized. Call register_kv_caches() before submitting store requests.)"
)


def _by_module(data: dict) -> dict[str, dict]:
    return {("builtin" if c.get("builtin") else c["module"]): c for c in data["candidates"]}


def test_unpatched_0_16_0_with_lmcache_0_4_6_hangs_on_its_first_hashed_lookup(cli, monkeypatch):
    """Measured: the builtin's first lookup with block hashes waits for good on a reply."""
    python = vllm_env("0.16.0", "0.5.3")
    monkeypatch.setenv("PYTHONPATH", str(lmcache_layer(python, "0.4.6")))
    code, out, _ = cli("doctor", "--live", "--python", python, "--json")
    data = json.loads(out)
    assert code == 2 and data["lmcache"] == "0.4.6" and not data["patched"]
    chosen = data["chosen_build"]
    assert chosen["verdict"] == "hangs"
    assert chosen["block_hashes"] == HASHES
    assert chosen["constructs_scheduler"] is True and chosen["scheduler_round_trip"] is False
    assert chosen["hangs"].startswith(
        "scheduler round trip: hangs: scheduler get_num_new_matched_tokens did not return in "
        "30 s; blocked in threading.py"
    )
    assert "lmcache/v1/multiprocess/futures.py" in chosen["hangs"]
    # lmcache's own main connector answers the same hashed lookup, and serves vLLM's loop.
    assert _by_module(data)[MAIN]["verdict"] == "serves"
    code, out, _ = cli("doctor", "--live", "--python", python)
    assert code == 2
    assert (
        "verdict: the engine would hang on its first requests: scheduler round trip: hangs: "
        "scheduler "
    ) in out


# Cells where none of lmcache's connectors works (it has none for vLLM 0.12/0.13, its copies
# for older vLLM speak another adapter API, its main connector needs vLLM 0.22): measured
# unpatched and with the series before it carried the adapter-aware builtin.
BUILTIN_ONLY = [
    ("0.13.0", "0.5.3"),
    ("0.16.0", "0.4.7"),
    ("0.18.1", "0.5.1"),
    ("0.21.0", "0.5.6"),
]


@pytest.mark.parametrize(("version", "lmcache"), BUILTIN_ONLY)
def test_patched_the_adapter_aware_builtin_works_where_no_lmcache_connector_does(
    patched, monkeypatch, version, lmcache
):
    python = patched(version, "0.5.3")
    monkeypatch.setenv("PYTHONPATH", str(lmcache_layer(python, lmcache)))
    diagnosis = live_check(python)
    assert diagnosis.ok, diagnosis.lines()
    assert diagnosis.data["chosen"] == f"{BUILTIN}.LMCacheMPConnectorUpstream"
    chosen = diagnosis.chosen
    assert chosen["verdict"] == "serves", chosen["engine_loop"]
    assert chosen["block_hashes"] == HASHES
    assert chosen["round_trip"] == (
        f"lookup with {HASHES} block hashes matched 0 tokens (async False); "
        "metadata LMCacheMPConnectorMetadata"
    )
    assert chosen["worker_driven"] is True
    not_run = {step: text for step, text in chosen["worker"].items() if text != "ran"}
    assert list(not_run) == ["wait_for_save"]
    if lmcache == "0.5.6":
        # lmcache 0.5.6's adapter makes the event (0007), and refuses without a KV cache
        # registered, which this one-step drive does not do (vLLM's scheduler loop does).
        assert not_run["wait_for_save"] == (
            "not run here: stopped: no KV cache is registered (RuntimeError: KV caches are not "
            "registered. Call register_kv_caches() before creating transfer events.)"
        )
    else:
        # Before 0.5.5 the builtin records a CUDA event for the store: where a CPU stops.
        assert not_run["wait_for_save"].startswith("not run here: stopped at torch/cuda/")
        assert not_run["wait_for_save"].endswith("(AssertionError): needs CUDA")
    # Rank 1 of TP 2 by field name: lmcache applies MLA itself from 0.4.7 on.
    assert chosen["geometry_detail"]["mla off"]["sent"] == {
        "kv_world_size": 2,
        "kv_worker_id": 1,
        "is_kv_writer": True,
    }
    assert chosen["geometry_detail"]["mla on"]["sent"] == {
        "kv_world_size": 1,
        "kv_worker_id": 0,
        "is_kv_writer": False,
    }
    others = [c for c in diagnosis.data["candidates"] if not c.get("builtin")]
    assert others and all(c.get("verdict") != "works" for c in others)


def test_an_lmcache_adapter_with_a_required_field_the_series_does_not_know_stops_both_roles(
    patched, tmp_path
):
    """lmcache 0.5.6 with one more required ParallelStrategy field (a test layer made from
    the real release; the server is the real 0.5.6): the builtin refuses to guess, in the
    scheduler and in the worker, with one error naming both versions and what to do."""
    from vllm_patches.diagnosis.servers import ServerPool

    python = patched("0.21.0", "0.5.3")
    real = lmcache_layer(python, "0.5.6")
    layer = tmp_path / "lmcache-0.5.6-replica"
    shutil.copytree(real, layer, symlinks=True)
    adapter = layer / "lmcache/integration/vllm/vllm_multi_process_adapter.py"
    text = adapter.read_text()
    assert text.count("    n_servers: int\n") == 1
    adapter.write_text(
        text.replace("    n_servers: int\n", "    n_servers: int\n    replica: int\n")
    )
    with ServerPool(tmp_path / "servers") as pool:
        server = pool.get(python, real, "0.5.6")
        assert not isinstance(server, str), server
        (data,) = build_layers(python, [Layer(layer, server.url)])
    assert data["chosen"] == f"{BUILTIN}.LMCacheMPConnectorUpstream"
    builtin = _by_module(data)["builtin"]
    refusal = (
        f"RuntimeError: vLLM {data['vllm']}'s LMCacheMPConnector does not know the adapter API "
        "of lmcache 0.5.6: its ParallelStrategy requires replica. Install an lmcache release "
        "whose adapter this vLLM knows (0.4.6 to 0.5.6 were checked), or set "
        "kv_connector_module_path to a connector made for lmcache 0.5.6."
    )
    assert builtin["verdict"] == "fails"
    assert builtin["constructs_scheduler"] is False and builtin["constructs_worker"] is False
    assert builtin["error"] == f"constructs scheduler: {refusal}"
    assert builtin["errors"]["constructs_worker"] == refusal


def test_patched_0_21_0_with_lmcache_0_5_3_works_as_far_as_a_cpu_allows(patched):
    python = patched("0.21.0", "0.5.3")
    diagnosis = live_check(python)
    assert diagnosis.ok, diagnosis.lines()
    assert diagnosis.data["chosen"] == f"{MAIN}_0201.LMCacheMPConnector"
    chosen = diagnosis.chosen
    assert chosen["block_hashes"] == HASHES
    assert chosen["worker"]["wait_for_save"] == NO_KV_CACHE
    assert chosen["worker"]["get_finished"] == "ran"
    assert chosen["second_lookup"] == "the same 512-token prompt again matched 0 tokens"
    assert chosen["geometry_detail"]["mla off"]["sent"] == {
        "kv_world_size": 2,
        "kv_worker_id": 1,
        "is_kv_writer": True,
    }
    lines = diagnosis.lines()
    assert f"scheduler round trip: {chosen['round_trip']}" in lines
    assert any(line.startswith("worker driven: bind_connector_metadata ran; ") for line in lines)
    assert any(line.startswith("vLLM's scheduler loop: serves (") for line in lines)
    assert (
        "only a GPU confirms: the KV cache registered by CUDA IPC, lmcache's GPU transfer "
        "kernels, GPU KV layouts, and a real model's numerics"
    ) in lines
    assert lines[-1] == "verdict: OK"


def test_the_builtin_of_0_21_0_with_lmcache_0_5_5_fails_and_sends_the_wrong_geometry(tmp_path):
    """Measured: the 7 positional values mean other fields to lmcache 0.5.5: rank 1 of TP 2
    describes itself as piece 0 of 1 (its TP size lands in n_servers)."""
    from vllm_patches.diagnosis.servers import ServerPool

    python = vllm_env("0.21.0", "0.5.3")
    layer = lmcache_layer(python, "0.5.5")
    with ServerPool(tmp_path) as pool:
        server = pool.get(python, layer, "0.5.5")
        assert not isinstance(server, str), server
        (data,) = build_layers(python, [Layer(layer, server.url)])
    builtin = _by_module(data)["builtin"]
    # What the engine meets first is the scheduler's construction error; had that been
    # mended alone, rank 1 would silently read and write rank 0's pieces.
    assert builtin["verdict"] == "fails" and builtin["geometry"] is False
    assert builtin["error"].startswith(
        "constructs scheduler: TypeError: LMCacheMPSchedulerAdapter.__init__() got an "
        "unexpected keyword argument 'server_url'"
    )
    off = builtin["geometry_detail"]["mla off"]
    assert off["sent"] == {"kv_world_size": 1, "kv_worker_id": 0, "is_kv_writer": True}
    assert off["expected"] == {"kv_world_size": 2, "kv_worker_id": 1, "is_kv_writer": True}
    assert off["fields"]["n_servers"] == 2


# What the geometry check measured, per lmcache release, for each candidate on vLLM 0.21.0
# (unpatched): True right, False wrong, None not handed over (the worker is not built).
GEOMETRY_0_21_0 = {
    "0.4.6": {"main": True, "_0201": True, "_0180": True, "builtin": True},
    "0.4.7": {"_0201": None, "_0180": False, "builtin": None},
    "0.5.0": {"_0201": None, "_0180": False, "builtin": None},
    "0.5.1": {"_0201": None, "_0180": False, "builtin": None},
    "0.5.2": {"_0201": True, "_0180": False, "builtin": None},
    "0.5.3": {"_0201": True, "_0180": False, "builtin": None},
    "0.5.4": {"_0201": True, "_0180": False, "builtin": None},
    "0.5.5": {"_0201": True, "_0180": False, "builtin": False},
    "0.5.6": {"builtin": False},
}


def _short(candidate: dict) -> str:
    if candidate.get("builtin"):
        return "builtin"
    return candidate["module"].removeprefix(MAIN) or "main"


def test_the_geometry_of_every_candidate_with_every_lmcache_release_from_0_4_6_on():
    python = vllm_env("0.21.0", "0.5.3")
    releases = list(GEOMETRY_0_21_0)
    layers = [Layer(lmcache_layer(python, lm), None) for lm in releases]
    found = build_layers(python, layers, geometry_only=True)
    measured = {
        data["lmcache"]: {
            _short(c): c["geometry_detail"]["ok"] for c in data["candidates"] if c.get("subclass")
        }
        for data in found
    }
    assert measured == GEOMETRY_0_21_0
    for data in found:
        for candidate in data["candidates"]:
            for key in ("mla off", "mla on"):
                got = candidate.get("geometry_detail", {}).get(key, {})
                if "sent" in got:  # ok is exactly "what was sent is what must be sent"
                    assert got["ok"] == (got["sent"] == got["expected"]), (data["lmcache"], key)


def test_the_patched_builtin_sends_every_lmcache_release_the_right_geometry(patched):
    """By field name, rank 1 of TP 2 (MLA off and on) reaches lmcache 0.4.6-0.5.6 as itself."""
    python = patched("0.21.0", "0.5.3")
    layers = [Layer(lmcache_layer(python, lm), None) for lm in GEOMETRY_0_21_0]
    found = build_layers(python, layers, geometry_only=True)
    assert {
        data["lmcache"]: _by_module(data)["builtin"]["geometry_detail"]["ok"] for data in found
    } == (dict.fromkeys(GEOMETRY_0_21_0, True))
