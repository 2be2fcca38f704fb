"""Connectors built for real against real LMCache servers, on real vLLM installs from sdists.

Nothing is replaced: lmcache's own multiprocess server runs on 127.0.0.1 (a CPU is enough),
each candidate is constructed for the scheduler and the worker role from a real VllmConfig,
and the scheduler takes one request through its lifecycle with the server.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import lmcache_unknown_to_the_builtin
from vllm_patches.diagnosis.doctor import live_check
from vllm_patches.diagnosis.servers import ServerPool
from vllm_patches.sources.venvs import lmcache_layer, vllm_env

pytestmark = [pytest.mark.slow, pytest.mark.network]
MAIN = "lmcache.integration.vllm.lmcache_mp_connector"
BUILTIN = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector"


def _by_module(data: dict) -> dict[str, dict]:
    return {c["module"]: c for c in data["candidates"]}


def _servers_running() -> int:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return sum("lmcache.v1.multiprocess.server --host" in line for line in ps.stdout.splitlines())


def test_unpatched_0_21_0_with_lmcache_0_5_3_fails_and_doctor_live_says_so(cli):
    python = vllm_env("0.21.0", "0.5.3")
    before = _servers_running()
    code, out, _ = cli("doctor", "--live", "--python", python, "--json")
    data = json.loads(out)
    assert code == 2 and not data["ok"]
    found = _by_module(data)
    assert found[f"{MAIN}_0201"]["scheduler_round_trip"] is True
    assert "ZMQError: Invalid argument (addr='t')" in found[f"{MAIN}_0180"]["error"]
    assert found[f"{MAIN}_0180"]["constructs_scheduler"] is False
    assert "ParallelStrategy" in found[BUILTIN]["error"]
    assert data["chosen_build"]["constructs_scheduler"] is False
    # The server doctor started is stopped again.
    assert _servers_running() == before
    code, out, _ = cli("doctor", "--live", "--python", python)
    assert code == 2
    assert "verdict: will fail when the engine starts: constructs scheduler: TypeError" in out
    # vLLM 0.21.0 honours kv_connector_module_path (#38301): the copy that works, named.
    assert out.endswith(
        f"fix: {MAIN}_0201 works here: name it with --kv-transfer-config "
        f'\'{{"kv_connector":"LMCacheMPConnector","kv_connector_module_path":"{MAIN}_0201",...}}\'\n'
    )


def test_patched_0_19_1_with_lmcache_0_5_3_constructs_both_roles_and_answers_a_lookup(patched):
    python = patched("0.19.1", "0.5.3")
    diagnosis = live_check(python)
    assert diagnosis.ok, diagnosis.lines()
    # lmcache's main connector needs a newer vLLM and no copy was measured on 0.19.1 (_0180
    # passes its URL string where lmcache 0.5 wants a list): the builtin, which speaks 0.5.3's
    # adapter API by name.
    assert diagnosis.data["chosen"] == f"{BUILTIN}.LMCacheMPConnectorUpstream"
    assert diagnosis.data["resolution"]["class"] == diagnosis.data["chosen"]
    assert diagnosis.data["resolution"]["reason"].startswith(
        f"{MAIN}: ImportError: cannot import name 'KVCacheSpecKind'"
    )
    assert "ZMQError" in _by_module(diagnosis.data)[f"{MAIN}_0180"]["error"]
    chosen = diagnosis.chosen
    assert chosen["constructs_scheduler"] and chosen["constructs_worker"]
    assert chosen["scheduler_round_trip"]


def test_an_adapter_the_builtin_does_not_know_stops_it_and_doctor_live_fails(
    patched, cli, monkeypatch, tmp_path
):
    python = patched("0.21.0", "0.5.3")
    monkeypatch.setenv("PYTHONPATH", str(lmcache_unknown_to_the_builtin(python, tmp_path)))
    code, out, _ = cli("doctor", "--live", "--python", python, "--json")
    data = json.loads(out)
    assert code == 2 and data["lmcache"] == "0.9.0"
    assert not any(c.get("scheduler_round_trip") for c in data["candidates"])
    assert data["chosen"] == f"{BUILTIN}.LMCacheMPConnectorUpstream"
    assert data["chosen_build"]["error"].startswith(
        "constructs scheduler: RuntimeError: vLLM 0.21.0+cpu's LMCacheMPConnector does not know "
        "the adapter API of lmcache 0.9.0: its ParallelStrategy requires cp_rank."
    )


def test_doctor_server_builds_against_a_running_server(cli, tmp_path):
    python = vllm_env("0.21.0", "0.5.3")
    with ServerPool(tmp_path) as pool:
        server = pool.get(python, None, "0.5.3")
        assert not isinstance(server, str), server
        code, out, _ = cli("doctor", "--server", server.url, "--python", python)
    assert code == 2
    assert f"built for real against the LMCache server at {server.url}" in out
    # Built and driven through vLLM's scheduler loop against that server.
    assert f"  {MAIN}_0201: serves (" in out


def test_doctor_server_of_an_older_lmcache_release_says_so(cli, tmp_path):
    """Measured: lmcache 0.5.3 and 0.5.6 interoperate; a 0.4.7 server does not answer 0.5.6."""
    python = vllm_env("0.33.0", "0.5.6")
    with ServerPool(tmp_path) as pool:
        server = pool.get(python, lmcache_layer(python, "0.4.7"), "0.4.7")
        assert not isinstance(server, str), server
        code, out, _ = cli("doctor", "--server", server.url, "--python", python)
    assert code == 2
    assert "Cannot reach the LMCache MP server" in out
    assert f"fix: check that a server listens at {server.url} and runs the same lmcache" in out
