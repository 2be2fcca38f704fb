"""Build connectors for real against real LMCache servers (the ground truth of "works").

The reader of ``probes/connector_build.py``: what that probe prints, one ``BUILD`` line per
lmcache layer, is :class:`LayerBuild` (each candidate a :class:`CandidateBuild`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

from packaging.version import Version

from vllm_patches._proc import logger, run_subprocess
from vllm_patches.diagnosis.verdict import SERVING, LoopVerdict, Verdict
from vllm_patches.errors import PatchToolError
from vllm_patches.probes import PROBES
from vllm_patches.sources.releases import cache_root, has_sdist, list_sdists, sdist_file

PROBE = PROBES / "connector_build.py"
COMPAT = PROBES / "compat"
"""A ``sitecustomize`` that restores one private torch name vLLM 0.17.x reads (see there)."""
# A tiny Llama: only its config.json is read (no weights, no tokenizer).
TINY_MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "torch_dtype": "float16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
STEP_NAMES = {
    "imports": "imports",
    "subclass": "subclasses KVConnectorBase_V1",
    "constructs_scheduler": "scheduler constructs",
    "scheduler_round_trip": "scheduler round trip (hashed)",
    "constructs_worker": "worker constructs",
    "worker_driven": "worker driven",
    "geometry": "geometry (TP 2)",
}
"""Each measured step, in order, as the reports name it (``probes/connector_build.STEPS``)."""


HELPERS = "tests/v1/kv_connector/unit/utils.py"
"""vLLM's own connector test helpers: its ``Scheduler`` built as its tests build it."""


def scheduler_helpers(version: str) -> tuple[Path | None, str]:
    """vLLM ``version``'s :data:`HELPERS` from its sdist (cached), or None and why not.

    A release that ships wheels only (0.15.x) has no tests: the helpers of the newest
    release before it with an sdist build its ``Scheduler`` (they call vLLM's public config
    and scheduler API), and a log line says whose they are.
    """
    try:
        source = version
        if not has_sdist(version):
            source = max((v for v in list_sdists() if Version(v) < Version(version)), key=Version)
            logger.warning("vLLM %s ships no sdist: using vLLM %s's %s", version, source, HELPERS)
        found = sdist_file(source, HELPERS)
    except (PatchToolError, ValueError) as exc:
        return None, f"vLLM {version}'s test helpers (its sdist) could not be had: {exc}"
    if found is None:
        return None, f"vLLM {source}'s sdist has no {HELPERS}"
    return found, ""


def model_dir() -> Path:
    """A directory holding the tiny model's ``config.json`` (in the cache)."""
    directory = cache_root() / "tiny-llama"
    config = directory / "config.json"
    text = json.dumps(TINY_MODEL_CONFIG, indent=2) + "\n"
    if not config.is_file() or config.read_text() != text:
        directory.mkdir(parents=True, exist_ok=True)
        config.write_text(text)
    return directory


@dataclass(frozen=True)
class Layer:
    """One lmcache to diagnose with: a layer directory (or the venv's own) and its server."""

    path: Path | None
    server: str | None


IMPORT_SECONDS = 300
LAYER_SECONDS = 1800
"""The bound on the whole probe: importing vLLM, then per layer (every step inside is bounded
by 30 s; this only catches a child stuck outside a step)."""


class EngineLoop(TypedDict, total=False):
    """vLLM's own scheduler driving one candidate (``probes/engine_loop.engine_loop``)."""

    verdict: LoopVerdict
    detail: str
    step: int
    steps: int
    preemptions: int
    delayed_frees: int
    round_trip: str
    hit: bool
    """Whether every request of the second wave loaded the first wave's KV."""
    stand_in: str
    seconds: float


class CandidateBuild(TypedDict, total=False):
    """One candidate as the probe measured it (``probes/serving.py`` names the steps)."""

    module: str
    builtin: bool
    chosen: bool
    imports: bool
    subclass: bool
    constructs_scheduler: bool
    scheduler_round_trip: bool
    constructs_worker: bool
    worker_driven: bool
    geometry: bool | None
    verdict: Verdict
    error: str
    """The first step's failure, as ``step name: error``."""
    errors: dict[str, str]
    """Each failed step's error, by step (the worker can fail apart from the scheduler)."""
    hangs: str
    block_hashes: int
    round_trip: str
    second_lookup: str
    worker: dict[str, str]
    """Each worker call: ``ran``, ``not run here: ...``, ``failed: ...``."""
    geometry_detail: dict[str, Any]
    """Per MLA setting: ``sent``, ``expected``, ``fields``, ``ok`` (or ``error``); and ``ok``."""
    geometry_error: str
    without_server: str
    """Where no server ran: how constructing each role went, pointed where nothing listens."""
    engine_loop: EngineLoop
    seconds: float


class LayerBuild(TypedDict, total=False):
    """One lmcache layer with one vLLM: versions, the resolution, every candidate's build."""

    vllm: str | None
    lmcache: str | None
    vllm_unmet: list[str]
    server: str | None
    patched: bool
    import_error: str
    chosen: str
    resolution: dict[str, str]
    candidates: list[CandidateBuild]
    chosen_build: CandidateBuild
    not_on_a_cpu: dict[str, str]
    geometry_of: str
    engine_loop: bool
    """Whether the candidates were driven through vLLM's scheduler loop."""


def works(candidate: CandidateBuild) -> bool | None:
    """Whether a candidate built for real did all a serving engine asks on a CPU (both roles,
    the hashed round trip, the worker driven, the TP 2 geometry, and vLLM's scheduler loop
    where it ran); None if not built, or where a CPU could not run a step of the loop."""
    if "constructs_scheduler" not in candidate or candidate.get("verdict") == "unverified":
        return None if candidate.get("subclass") else False
    return candidate.get("verdict") in SERVING


def loop_text(loop: EngineLoop) -> str:
    """What vLLM's scheduler loop did with a candidate, in words."""
    counts = (
        f"{loop.get('steps', 0)} steps, {loop.get('preemptions', 0)} preempted, "
        f"{loop.get('delayed_frees', 0)} delayed frees"
    )
    stand_in = f"; with one stand-in: {loop['stand_in']}" if loop.get("stand_in") else ""
    verdict = loop.get("verdict", "")
    if verdict == "serves":
        return f"serves ({counts}; round trip: {loop.get('round_trip', '')}{stand_in})"
    if verdict == "raises":
        return f"raises at {loop.get('detail', '')}{stand_in}"
    return f"{verdict} ({loop.get('detail', '')}; {counts}{stand_in})"


def failed_step(candidate: CandidateBuild) -> str:
    """The first step a candidate failed, as the reports name it; '' when it worked."""
    for key, name in STEP_NAMES.items():
        if key in candidate and candidate[key] is False:
            return name
    return ""


def built_text(candidate: CandidateBuild) -> str:
    """What a real build of one candidate did, in words: ``works``, ``hangs (...)``,
    ``wrong geometry (...)`` or ``fails at: STEP (...)``."""
    verdict = candidate.get("verdict")
    loop = candidate.get("engine_loop")
    if loop is not None and verdict in ("serves", "wrong blocks", "leaks", "unverified"):
        return loop_text(loop)
    if loop is not None and loop.get("verdict") in ("raises", "hangs"):
        return f"{verdict} in vLLM's scheduler loop: {loop_text(loop)}"
    if verdict == "works":
        return "works (one engine step; vLLM's scheduler loop not run)"
    if verdict == "hangs":
        return f"hangs ({candidate.get('hangs', '')})"
    if verdict == "wrong geometry":
        return f"wrong geometry ({candidate.get('geometry_error', '')})"
    step = failed_step(candidate)
    if not step and verdict == "fails":
        return f"fails ({candidate.get('error', '')})"
    if not step and "without_server" in candidate:
        alone = candidate["without_server"]
        return f"imports (not built: no server; constructed with nothing listening, {alone})"
    if not step:
        return "imports (not built: no server)"
    geometry = candidate.get("geometry_error")
    also = f"; and the wrong geometry: {geometry}" if geometry else ""
    return f"fails at: {step} ({candidate.get('error', '')}{also})"


def worker_reached(candidate: CandidateBuild) -> str:
    """How far the worker's calls went, in words: ``ran`` or where each stopped and why."""
    calls = candidate.get("worker", {})
    return "; ".join(f"{call} {state}" for call, state in calls.items())


def build_layers(
    python: str | Path,
    layers: list[Layer],
    env: dict[str, str] | None = None,
    *,
    geometry_only: bool = False,
    helpers: Path | None = None,
) -> list[LayerBuild]:
    """Run the build probe in ``python`` for each layer, vLLM imported once for all.

    :param geometry_only: measure only what each candidate's worker of rank 1 in TP 2 hands
        lmcache (no server needed; ``geometry_detail`` per candidate).
    :param helpers: the release's :data:`HELPERS`: each candidate whose roles construct is
        then driven through vLLM's own scheduler loop (``probes/engine_loop.py``).

    :returns: per layer, what the probe measured (``connector_build.diagnose``), or
        ``{"import_error": "the probe failed: ..."}`` when its process died.
    """
    with tempfile.TemporaryDirectory(prefix="vllm-patches-build-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "model_dir": str(model_dir()),
                    "geometry_only": geometry_only,
                    "test_utils": str(helpers) if helpers else None,
                    "layers": [
                        {"path": str(la.path) if la.path else None, "server": la.server}
                        for la in layers
                    ],
                }
            )
        )
        inherited = os.environ.get("PYTHONPATH")
        full_env = {
            "PYTHONPATH": f"{COMPAT}:{inherited}" if inherited else str(COMPAT),
            "LMCACHE_LOG_LEVEL": "ERROR",
            "HF_HUB_OFFLINE": "1",
            "VLLM_CACHE_ROOT": tmp,
            "PYTHONWARNINGS": "ignore",
            **(env or {}),
        }
        proc = run_subprocess(
            [python, PROBE, spec],
            cwd=Path(tmp),
            env=full_env,
            what="building the connectors",
            timeout=IMPORT_SECONDS + LAYER_SECONDS * len(layers),
        )
    return cast("list[LayerBuild]", per_layer_results(proc.stdout, "BUILD"))


def per_layer_results(stdout: str, tag: str) -> list[dict[str, Any]]:
    """What a probe's forked children printed (``probes/connector_build.per_layer``), one per
    layer; a child that died is ``{"candidates": [], "import_error": "the probe failed: ..."}``.
    """
    found: list[dict] = []
    pending: dict | None = None
    failure = ""
    for line in stdout.splitlines():
        if line.startswith(f"{tag} "):
            pending = json.loads(line[len(tag) + 1 :])
        elif line.startswith("FAILED "):
            failure = line[len("FAILED ") :]
        elif line.startswith("LAYER "):
            status = failure or line.split(" ", 2)[2]
            failed = {"candidates": [], "import_error": f"the probe failed: {status}"}
            found.append(pending if pending is not None else failed)
            pending, failure = None, ""
    return found
