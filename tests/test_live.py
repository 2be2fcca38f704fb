"""Connectors built for real against real LMCache servers, on real vLLM installs from sdists.

Nothing is replaced: lmcache's own multiprocess server runs on 127.0.0.1 (a CPU is enough),
each candidate is constructed for the scheduler and the worker role from a real VllmConfig,
and the scheduler takes one request through its lifecycle with the server.
"""

from __future__ import annotations

import json
import subprocess

import pytest
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
    assert f"fix: apply the series (vllm-patches apply --python PY): it picks {MAIN}_0201" in out


def test_patched_0_19_1_with_lmcache_0_5_3_constructs_both_roles_and_answers_a_lookup(patched):
    python = patched("0.19.1", "0.5.3")
    diagnosis = live_check(python)
    assert diagnosis.ok, diagnosis.lines()
    # _0180 passes its URL string where lmcache 0.5 wants a list: the resolution now skips it.
    assert diagnosis.data["chosen"] == f"{MAIN}_0201.LMCacheMPConnector"
    assert "server_urls takes list[str], not a str" in diagnosis.data["resolution"]["reason"]
    assert "ZMQError" in _by_module(diagnosis.data)[f"{MAIN}_0180"]["error"]
    chosen = diagnosis.chosen
    assert chosen["constructs_scheduler"] and chosen["constructs_worker"]
    assert chosen["scheduler_round_trip"]


def test_where_nothing_works_the_clear_error_and_doctor_live_fails(patched, cli, monkeypatch):
    python = patched("0.21.0", "0.5.3")
    monkeypatch.setenv("PYTHONPATH", str(lmcache_layer(python, "0.5.6")))
    code, out, _ = cli("doctor", "--live", "--python", python, "--json")
    data = json.loads(out)
    assert code == 2 and data["lmcache"] == "0.5.6"
    assert not any(c.get("scheduler_round_trip") for c in data["candidates"])
    assert data["chosen"].endswith("LMCacheMPConnectorUnavailable")
    error = data["chosen_build"]["error"]
    assert error.startswith(
        "constructs scheduler: RuntimeError: LMCacheMPConnector: no connector can be built "
        "with vLLM 0.21.0 and lmcache 0.5.6"
    )


def test_doctor_server_builds_against_a_running_server(cli, tmp_path):
    python = vllm_env("0.21.0", "0.5.3")
    with ServerPool(tmp_path) as pool:
        server = pool.get(python, None, "0.5.3")
        assert not isinstance(server, str), server
        code, out, _ = cli("doctor", "--server", server.url, "--python", python)
    assert code == 2
    assert f"built for real against the LMCache server at {server.url}" in out
    assert f"  {MAIN}_0201: works" in out


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
