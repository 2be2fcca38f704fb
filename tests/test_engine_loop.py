"""vLLM's own scheduler loop driving the connector on a CPU, with a real KV round trip.

Real parts only: vLLM built from its sdist, lmcache from PyPI and its own multiprocess
server on 127.0.0.1, vLLM's ``Scheduler`` built by that release's own test helpers
(``tests/v1/kv_connector/unit/utils.py`` from the sdist). The one stand-in the probe may use
(a completed CPU event where a connector asks torch for a CUDA event, named in the output) is
not needed here: lmcache 0.5.6's adapter makes the event, and the patched builtin asks it.
"""

from __future__ import annotations

import pytest
from vllm_patches.diagnosis.live import Layer, build_layers, scheduler_helpers
from vllm_patches.diagnosis.servers import ServerPool
from vllm_patches.sources.venvs import lmcache_layer, vllm_env

pytestmark = [pytest.mark.slow, pytest.mark.network]
MAIN = "lmcache.integration.vllm.lmcache_mp_connector"
BUILTIN = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector"
CRASH = (
    "AttributeError: 'CachedRequestData' object has no attribute 'resumed_req_ids' "
    "(lmcache/integration/vllm/lmcache_mp_connector.py:1732 in _process_cached_requests)"
)


def test_0_34_0_with_lmcache_0_5_6_unpatched_raises_at_its_first_cached_step(cli):
    """vLLM 0.34.0 re-sends a resumed request as new (no resumed_req_ids); lmcache 0.5.6's
    connector, which #42596 picks, still reads the field: the engine dies on its first
    request longer than one chunk, which one scheduling step never shows."""
    python = vllm_env("0.34.0", "0.5.6")
    code, out, _ = cli("doctor", "--live", "--python", python)
    assert code == 2, out
    assert f"LMCacheMPConnector resolves to {MAIN}.LMCacheMPConnector\n" in out
    verdict = next(line for line in out.splitlines() if line.startswith("verdict: "))
    assert verdict.startswith(
        "verdict: the engine would fail on its first requests: vLLM's scheduler loop raises at "
        "step "
    )
    assert verdict.endswith(f": schedule: {CRASH}")
    step = int(verdict.split("raises at step ", 1)[1].split(":", 1)[0])
    assert 2 <= step <= 5  # the first step after the first chunk of the first request
    assert "fix: apply the series (vllm-patches apply --python PY)" in out


def test_0_34_0_with_lmcache_0_5_6_patched_serves_with_a_round_trip(patched, cli):
    """The series passes over lmcache's class (it predates kv_cache_access) and its builtin
    runs the whole loop: chunked prefill, decode, preemption, delayed frees, and a second
    wave that loads the first wave's KV, byte for byte."""
    python = patched("0.34.0", "0.5.6")
    code, out, _ = cli("doctor", "--live", "--python", python)
    assert code == 0, out
    assert f"LMCacheMPConnector resolves to {BUILTIN}.LMCacheMPConnectorUpstream\n" in out
    assert f"  {MAIN}: fails in vLLM's scheduler loop: raises at step " in out
    loop = next(line for line in out.splitlines() if line.startswith("vLLM's scheduler loop: "))
    assert loop.startswith("vLLM's scheduler loop: serves (")
    counts = loop.split("serves (", 1)[1].split(";", 1)[0]
    steps, preempted, frees = (int(part.split()[0]) for part in counts.split(", "))
    assert steps > 300 and preempted >= 1 and frees >= 1, loop
    assert (
        "round trip: 2 requests of the second wave loaded 512 to 512 of 544 prompt tokens, "
        "every one equal to what the first wave wrote" in loop
    )
    # lmcache 0.5.6's adapter makes the transfer event and the builtin asks it (0007): no
    # stand-in.
    assert "stand-in" not in loop
    assert "only a GPU confirms: the KV cache registered by CUDA IPC" in out
    assert out.endswith("verdict: OK\n")


GENERATIONS = [("0.13.0", "0.5.3"), ("0.16.0", "0.4.7"), ("0.21.0", "0.5.6"), ("0.34.0", "0.5.6")]
"""One vLLM per generation of the builtin the series carries (0.12/0.13's scheduler call,
0.14-0.18, 0.20-0.21, 0.22 on), each with the venv the other slow tests build; lmcache 0.5.6
is laid over it where the venv has another."""
ROUND_TRIP = (
    "2 requests of the second wave loaded 512 to 512 of 544 prompt tokens, every one equal to "
    "what the first wave wrote"
)


@pytest.mark.parametrize(("version", "venv_lmcache"), GENERATIONS)
def test_the_builtin_round_trips_real_kv_on_a_cpu_with_no_stand_in(
    patched, tmp_path, version, venv_lmcache
):
    """lmcache 0.5.6's adapter makes the transfer event (None on a CPU) and the patched
    builtin asks it for one (0007): vLLM's scheduler loop runs with a real hit and the loaded
    blocks equal the stored bytes, with nothing stood in."""
    python = patched(version, venv_lmcache)
    layer = None if venv_lmcache == "0.5.6" else lmcache_layer(python, "0.5.6")
    helpers, why = scheduler_helpers(version)
    assert helpers is not None, why
    with ServerPool(tmp_path) as pool:
        server = pool.get(python, layer, "0.5.6")
        assert not isinstance(server, str), server
        (data,) = build_layers(python, [Layer(layer, server.url)], helpers=helpers)
    builtin = next(c for c in data["candidates"] if c.get("builtin"))
    loop = builtin["engine_loop"]
    assert loop["verdict"] == "serves", loop
    assert "stand_in" not in loop
    assert loop["round_trip"] == ROUND_TRIP and loop["hit"] is True
    assert loop["steps"] > 300 and loop["preemptions"] >= 1 and loop["delayed_frees"] >= 1
    assert data["chosen"].endswith(".LMCacheMPConnectorUpstream")
