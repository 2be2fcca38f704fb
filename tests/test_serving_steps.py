"""The probe's serving-engine steps that need no vLLM: the bound on a step, where a CPU stops a
worker call, the geometry a worker must send, a forked build that never returns.

The real builds against real servers are in ``test_serving.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from vllm_patches.diagnosis.live import built_text, failed_step, works
from vllm_patches.diagnosis.matrix import verdict
from vllm_patches.probes import serving
from vllm_patches.sources.venvs import lmcache_layer, vllm_env


def _blocks_on_an_event() -> None:
    threading.Event().wait()


def test_a_step_past_its_bound_is_a_hang_naming_the_frame_it_blocked_in():
    started = time.monotonic()
    with (
        pytest.raises(serving.Hang) as hang,
        serving.bounded("scheduler get_num_new_matched_tokens", 0.3),
    ):
        _blocks_on_an_event()
    assert time.monotonic() - started < 5
    text = str(hang.value)
    assert text.startswith(
        "scheduler get_num_new_matched_tokens did not return in 0 s; blocked in "
    )
    assert "in _blocks_on_an_event" in text
    assert text.index("in wait") < text.index("in _blocks_on_an_event")  # innermost first


def test_a_hang_is_not_swallowed_by_a_connectors_except_exception():
    def careless() -> str:
        try:
            _blocks_on_an_event()
        except Exception:
            return "swallowed"
        return "returned"

    with pytest.raises(serving.Hang), serving.bounded("worker wait_for_save", 0.2):
        careless()


def test_an_enclosing_bound_holds_after_an_inner_step_and_ends_it_first():
    with pytest.raises(serving.Hang) as hang, serving.bounded("scheduler round trip", 0.4):
        with serving.bounded("scheduler update_state_after_alloc", 0.1):
            pass
        _blocks_on_an_event()  # the enclosing bound is in force again
    assert str(hang.value).startswith("scheduler round trip did not return in 0 s")
    with (
        pytest.raises(serving.Hang) as hang,
        serving.bounded("scheduler round trip", 0.3),
        serving.bounded("scheduler get_num_new_matched_tokens", 60),
    ):
        _blocks_on_an_event()  # the enclosing bound ends first, named by the inner step
    assert str(hang.value).startswith("scheduler get_num_new_matched_tokens did not return in 0 s")


def test_a_step_within_its_bound_leaves_the_timer_and_handler_as_they_were():
    import signal

    handler = signal.getsignal(signal.SIGALRM)
    before = signal.getitimer(signal.ITIMER_REAL)[0]  # pytest-timeout's, or none
    with serving.bounded("worker get_finished", 5):
        pass
    after = signal.getitimer(signal.ITIMER_REAL)[0]
    assert signal.getsignal(signal.SIGALRM) is handler
    assert (after == before == 0.0) or 0 < before - after < 1


def _raised_in(path: str, error: BaseException) -> BaseException:
    """``error`` as raised by code whose file is ``path`` (a frame of that file)."""
    try:
        exec(compile("raise error", path, "exec"), {"error": error})
    except BaseException as exc:
        return exc
    raise AssertionError("not raised")


TORCH_CUDA = "/venv/lib/python3.11/site-packages/torch/cuda/__init__.py"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            _raised_in(TORCH_CUDA, AssertionError("Torch not compiled with CUDA enabled")),
            "stopped at torch/cuda/__init__.py:1 (AssertionError): needs CUDA",
        ),
        # Decided by the frame, not by words: the same text raised elsewhere is a failure, and
        # so are messages that merely contain "hip" or "cuda".
        (AssertionError("Torch not compiled with CUDA enabled"), ""),
        (KeyError("ownership of the chunk"), ""),
        (RuntimeError("the relationship shipped with cudagraphs"), ""),
        (
            RuntimeError(
                "Transfer context is not initialized. Call register_kv_caches() before "
                "submitting store requests."
            ),
            "stopped: no KV cache is registered (RuntimeError: Transfer context is not "
            "initialized. Call register_kv_caches() before submitting store requests.)",
        ),
        (AttributeError("'LMCacheMPWorkerAdapter' object has no attribute 'use_mla'"), ""),
        (TypeError("got an unexpected keyword argument 'server_url'"), ""),
    ],
)
def test_where_a_cpu_stops_a_worker_call_and_what_is_a_real_failure(error, expected):
    assert serving.cpu_stop(error) == expected


class _Worker:
    """A worker whose calls behave as measured: lmcache 0.4.7 removed ``use_mla``."""

    def __init__(self, wait_for_save_error: Exception) -> None:
        self.error = wait_for_save_error
        self.calls: list[str] = []

    def bind_connector_metadata(self, metadata: object) -> None:
        self.calls.append("bind_connector_metadata")

    def start_load_kv(self, forward_context: object) -> None:
        self.calls.append("start_load_kv")

    def wait_for_save(self) -> None:
        self.calls.append("wait_for_save")
        raise self.error

    def get_finished(self, finished: set[str]) -> tuple[None, None]:
        self.calls.append("get_finished")
        return None, None

    def clear_connector_metadata(self) -> None:
        self.calls.append("clear_connector_metadata")


def test_a_call_stopped_by_the_cpu_is_said_and_the_next_calls_still_run(monkeypatch):
    monkeypatch.setattr(serving, "forward_context", lambda fill: None)
    worker = _Worker(_raised_in(TORCH_CUDA, AssertionError("Torch not compiled with CUDA enabled")))
    done = serving.drive_worker(worker, object(), fill=None)
    assert worker.calls == list(serving.WORKER_CALLS)
    assert done["wait_for_save"] == (
        "not run here: stopped at torch/cuda/__init__.py:1 (AssertionError): needs CUDA"
    )
    assert done["get_finished"] == done["clear_connector_metadata"] == "ran"


def test_a_real_failure_of_a_worker_call_ends_the_drive(monkeypatch):
    monkeypatch.setattr(serving, "forward_context", lambda fill: None)
    worker = _Worker(AttributeError("'LMCacheMPWorkerAdapter' object has no attribute 'use_mla'"))
    done = serving.drive_worker(worker, object(), fill=None)
    assert done == {
        "bind_connector_metadata": "ran",
        "start_load_kv": "ran",
        "wait_for_save": (
            "failed: AttributeError: 'LMCacheMPWorkerAdapter' object has no attribute 'use_mla'"
        ),
    }
    assert "get_finished" not in worker.calls


PARALLEL_STRATEGY = Path(__file__).parent / "programs" / "parallel_strategy.py"


@pytest.mark.slow
@pytest.mark.parametrize("mla", [False, True])
@pytest.mark.parametrize("lmcache", ["0.4.7", "0.5.3", "0.5.6"])
def test_what_rank_1_of_tp_2_must_send_is_what_lmcaches_own_parallel_strategy_derives(lmcache, mla):
    """The probe's expected geometry, against lmcache's own derivation from vLLM's world size
    and rank (0.4.7 on; 0.4.6 takes the pieces as given, so it cannot be the oracle)."""
    python = vllm_env("0.21.0", "0.5.6")
    layer = lmcache_layer(python, lmcache)
    args = [str(serving.TP_SIZE), str(serving.RANK), str(serving.TP_SIZE), str(int(mla))]
    proc = subprocess.run(
        [str(python), str(PARALLEL_STRATEGY), *args],
        env={**os.environ, "PYTHONPATH": str(layer)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert serving.expected_geometry(mla) == json.loads(proc.stdout)


def test_a_forked_build_that_never_returns_is_killed_and_said(monkeypatch):
    monkeypatch.setattr(serving, "STEP_SECONDS", 0.5)
    monkeypatch.setattr(serving, "GRACE_SECONDS", 0.5)
    started = time.monotonic()
    got = serving._in_child(lambda: {"never": _blocks_on_an_event()})
    assert time.monotonic() - started < 10
    assert got["error"].startswith("hangs: geometry did not return in 0 s; blocked in ")


def _candidate(**steps: object) -> dict:
    return {"module": "m", "imports": True, "subclass": True, **steps}


def test_the_verdict_words_name_the_step_and_works_needs_every_step():
    hung = _candidate(
        constructs_scheduler=True,
        scheduler_round_trip=False,
        verdict="hangs",
        hangs="scheduler round trip: hangs: scheduler get_num_new_matched_tokens did not return",
        error="scheduler round trip: hangs: ...",
    )
    assert built_text(hung) == (
        "hangs (scheduler round trip: hangs: scheduler get_num_new_matched_tokens did not return)"
    )
    assert works(hung) is False
    geometry = "rank 1 of TP 2, mla off: sent {'kv_world_size': 1}, expected {...}"
    wrong = _candidate(
        constructs_scheduler=True,
        scheduler_round_trip=True,
        constructs_worker=True,
        worker_driven=True,
        geometry=False,
        verdict="wrong geometry",
        geometry_error=geometry,
    )
    assert built_text(wrong) == f"wrong geometry ({geometry})"
    both = _candidate(
        constructs_scheduler=False,
        constructs_worker=True,
        geometry=False,
        verdict="fails",
        geometry_error=geometry,
        error="constructs scheduler: TypeError: x",
    )
    assert built_text(both) == (
        f"fails at: scheduler constructs (constructs scheduler: TypeError: x; "
        f"and the wrong geometry: {geometry})"
    )
    assert failed_step(both) == "scheduler constructs"
    assert works(_candidate(constructs_scheduler=True, verdict="works")) is True
    assert works(_candidate()) is None  # imports, never built: no server


def test_without_a_server_only_the_series_refusal_before_connecting_is_a_verdict():
    """No server: the roles are constructed with nothing listening. The series' refusal (it
    checks lmcache's adapter API before connecting) is the cell's clear error; any other
    refusal, or a class that constructs, leaves the cell not built."""
    refusal = (
        "RuntimeError: vLLM 0.25.1+cpu's LMCacheMPConnector does not know the adapter API of "
        "lmcache 0.4.1: its multi-process adapter does not import (...)"
    )
    refused = _candidate(
        without_server=f"the scheduler raises {refusal}",
        error=f"constructs scheduler: {refusal}",
    )
    assert works(refused) is None
    assert built_text(refused) == (
        "imports (not built: no server; constructed with nothing listening, the scheduler "
        f"raises {refusal})"
    )
    side = {"chosen": "vllm.x.LMCacheMPConnectorUpstream", "works": None}
    assert verdict({"patched": {**side, "error": refused["error"]}}, "patched") == "clear error"
    other = "constructs scheduler: TypeError: __init__() takes 3 positional arguments"
    assert verdict({"patched": {**side, "error": other}}, "patched") == "not built"
    assert verdict({"patched": {**side, "error": ""}}, "patched") == "not built"
    constructed = _candidate(without_server="both roles construct")
    assert built_text(constructed) == (
        "imports (not built: no server; constructed with nothing listening, both roles construct)"
    )


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # What an engine meets first: a role that does not construct stops it at start-up.
        ({"constructs_scheduler": False, "geometry": False}, "fails"),
        ({"constructs_scheduler": True, "constructs_worker": False}, "fails"),
        # Then a request that never returns.
        (
            {"constructs_scheduler": True, "scheduler_round_trip": False, "hangs": "..."},
            "hangs",
        ),
        (
            {"constructs_scheduler": True, "constructs_worker": True, "worker_driven": False},
            "fails",
        ),
        # Silent: everything runs, the pieces are wrong.
        (dict.fromkeys(serving.STEPS, True) | {"geometry": False}, "wrong geometry"),
        (dict.fromkeys(serving.STEPS, True), "works"),
        # Geometry not measured (nothing handed over): not "works".
        (dict.fromkeys(serving.STEPS, True) | {"geometry": None}, "fails"),
    ],
)
def test_the_verdict_is_what_an_engine_meets_first(steps, expected):
    assert serving.verdict(steps) == expected


def test_the_reports_name_every_step_the_probe_measures_in_its_order():
    from vllm_patches.diagnosis.live import STEP_NAMES

    assert list(STEP_NAMES)[2:] == list(serving.STEPS)


def test_an_error_keeps_the_series_whole_refusal_and_is_cut_at_a_word_when_longer():
    refusal = RuntimeError(
        "vLLM 0.21.0's LMCacheMPConnector does not know the adapter API of lmcache "
        "0.9.0.post1: its multi-process adapter does not import (No module named "
        "'lmcache.integration.vllm.vllm_multi_process_adapter'). Install an lmcache release "
        "whose adapter this vLLM knows (0.4.6 to 0.5.6 were checked), or set "
        "kv_connector_module_path to a connector made for lmcache 0.9.0.post1."
    )
    assert serving.error_text(refusal) == f"RuntimeError: {refusal}"
    long = serving.error_text(ValueError("word " * 200))
    assert len(long) <= 602 and long.endswith(" word \N{HORIZONTAL ELLIPSIS}")
    # One word longer than the bound is cut at the bound.
    assert serving.clip("x" * 700) == "x" * 600 + " \N{HORIZONTAL ELLIPSIS}"


ALL_STEPS = dict.fromkeys(serving.STEPS, True)
CRASH = (
    "step 4: schedule: AttributeError: 'CachedRequestData' object has no attribute "
    "'resumed_req_ids' (lmcache/integration/vllm/lmcache_mp_connector.py:1732 in "
    "_process_cached_requests)"
)


@pytest.mark.parametrize(
    ("loop", "expected"),
    [
        ({"verdict": "serves", "detail": "..."}, "serves"),
        ({"verdict": "raises", "step": 4, "detail": CRASH}, "fails"),
        ({"verdict": "hangs", "detail": "step 9: nothing scheduled for 20 s"}, "hangs"),
        ({"verdict": "wrong blocks", "detail": "step 7: ..."}, "wrong blocks"),
        ({"verdict": "leaks", "detail": "assert_scheduler_empty: ..."}, "leaks"),
        ({"verdict": "unverified", "detail": "step 6: wait_for_save: ..."}, "unverified"),
    ],
)
def test_after_the_one_step_probe_the_scheduler_loop_decides(loop, expected):
    info = {**ALL_STEPS, "engine_loop": loop}
    assert serving.verdict(info) == expected
    # The one engine step alone (no scheduler loop run) is the older, weaker "works".
    assert serving.verdict(dict(ALL_STEPS)) == "works"


def test_a_loop_that_raises_is_said_with_its_step_and_frame():
    loop = {"verdict": "raises", "step": 4, "detail": CRASH, "steps": 3}
    info = {**ALL_STEPS, "engine_loop": loop}
    info["verdict"] = serving.verdict(info)
    assert info["error"] == f"engine loop: raises at {CRASH}"
    assert built_text(info) == f"fails in vLLM's scheduler loop: raises at {CRASH}"
    assert works(_candidate(**info)) is False


def test_a_loop_that_serves_says_its_counts_round_trip_and_stand_in():
    loop = {
        "verdict": "serves",
        "steps": 514,
        "preemptions": 3,
        "delayed_frees": 6,
        "round_trip": "2 requests of the second wave loaded 512 to 512 of 544 prompt tokens",
        "stand_in": "a completed CPU event in place of torch.cuda.Event",
    }
    candidate = _candidate(**ALL_STEPS, engine_loop=loop, verdict="serves")
    assert built_text(candidate) == (
        "serves (514 steps, 3 preempted, 6 delayed frees; round trip: 2 requests of the "
        "second wave loaded 512 to 512 of 544 prompt tokens; with one stand-in: a completed "
        "CPU event in place of torch.cuda.Event)"
    )
    assert works(candidate) is True
    # A step no CPU can run is not a pass.
    unverified = {**loop, "verdict": "unverified", "detail": "step 6: wait_for_save: ..."}
    assert works(_candidate(**ALL_STEPS, engine_loop=unverified, verdict="unverified")) is None
