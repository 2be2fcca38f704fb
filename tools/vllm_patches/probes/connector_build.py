"""Build LMCacheMPConnector candidates for real, inside the interpreter that holds vLLM.

Run by path with that interpreter (it imports only the standard library, vLLM and lmcache)::

    PY connector_build.py SPEC.json

``SPEC.json`` holds ``layers`` (a list of ``{"path": DIR | null, "server": URL | null}``) and
``model_dir`` (a directory holding a model's ``config.json``). vLLM is imported once; a child
is forked per layer, which puts the layer first on ``sys.path`` (an lmcache release installed
alone), imports lmcache from it and prints one ``BUILD {json}`` line: versions, every
candidate's steps (imports, subclass, each role constructed against the server, the
scheduler's request lifecycle) and the class ``LMCacheMPConnector`` resolves to. Without a
server, only imports and subclass are measured. The parent prints ``LAYER i exit code N``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata as md
import inspect
import json
import os
import pkgutil
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

VLLM_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector"
PACKAGE = "lmcache.integration.vllm"
SHARED = (
    "vllm.config",
    "vllm.distributed.kv_transfer.kv_connector.factory",
    "vllm.distributed.kv_transfer.kv_connector.v1.base",
    "vllm.v1.request",
    "vllm.v1.core.sched.output",
    "vllm.v1.kv_cache_interface",
)
BLOCK_SIZE = 16
PROMPT_TOKENS = 512
LOOKUP_SECONDS = 20.0
STEPS = ("constructs_scheduler", "constructs_worker", "scheduler_round_trip")
"""What a real build measures: each role constructed, the scheduler's request lifecycle."""
WORKER_LIMIT = (
    "register_kv_caches and the KV transfer need the accelerator's KV cache (GPU memory "
    "shared with the server), which a CPU does not have: the worker is built, not driven"
)


def version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def error_text(exc: BaseException) -> str:
    """``Type: message``, one line, without file paths."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return re.sub(r" \(/[^)]*\)", "", text)[:300]


def unmet(project: str) -> list[str]:
    """``project``'s requirements that the installed packages do not meet."""
    from packaging.requirements import Requirement

    found = []
    for text in md.requires(project) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have = version(req.name)
        if have is None:
            found.append(f"{req.name} is not installed ({project} needs {req})")
        elif not req.specifier.contains(have, prereleases=True):
            found.append(f"{req.name} {have} is installed, {project} needs {req.specifier}")
    return found


def lmcache_modules() -> list[str]:
    """lmcache's main connector module, then its frozen copies, newest first."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
        locations = spec.submodule_search_locations or [] if spec else []
        names = [m.name for m in pkgutil.iter_modules(locations)]
    except ImportError:
        names = []
    frozen = sorted(
        (n for n in names if re.fullmatch(r"lmcache_mp_connector_\d{4}", n)), reverse=True
    )
    return [f"{PACKAGE}.{n}" for n in ["lmcache_mp_connector", *frozen] if n in names]


def fill(target: Any, known: dict[str, Any]) -> Any:
    """Call ``target`` with the ``known`` arguments it takes; other required ones get None."""
    kwargs = {}
    for name, param in inspect.signature(target).parameters.items():
        if name in known:
            kwargs[name] = known[name]
        elif param.default is inspect.Parameter.empty and param.kind in (
            param.POSITIONAL_OR_KEYWORD,
            param.KEYWORD_ONLY,
        ):
            kwargs[name] = None
    return target(**kwargs)


def vllm_config(model_dir: str, server: str) -> Any:
    """A real VllmConfig for a tiny local model, CPU device, the connector pointed at ``server``."""
    from vllm.config import DeviceConfig, KVTransferConfig, ModelConfig, VllmConfig

    host, port = server.rsplit(":", 1)
    transfer = KVTransferConfig(
        kv_connector="LMCacheMPConnector",
        kv_role="kv_both",
        kv_connector_extra_config={
            "lmcache.mp.host": host,
            "lmcache.mp.port": int(port),
            "lmcache.mp.mq_timeout": 10.0,
        },
    )
    config = VllmConfig(
        model_config=ModelConfig(model=model_dir, skip_tokenizer_init=True),
        device_config=DeviceConfig(device="cpu"),
        kv_transfer_config=transfer,
    )
    config.cache_config.block_size = BLOCK_SIZE
    return config


def kv_cache_config(config: Any) -> Any:
    """A KVCacheConfig of one full-attention group over the model's layers."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    model = config.model_config
    layers = model.get_num_layers(config.parallel_config)
    spec = fill(
        FullAttentionSpec,
        {
            "block_size": BLOCK_SIZE,
            "num_kv_heads": model.get_num_kv_heads(config.parallel_config),
            "head_size": model.get_head_size(),
            "dtype": torch.float16,
            "use_mla": False,
            "sliding_window": None,
        },
    )
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    group = fill(KVCacheGroupSpec, {"layer_names": names, "kv_cache_spec": spec})
    return fill(
        KVCacheConfig, {"num_blocks": 64, "kv_cache_tensors": [], "kv_cache_groups": [group]}
    )


def construct(cls: type, config: Any, role: Any, kv_config: Any) -> Any:
    """Construct ``cls`` for ``role`` as vLLM's connector factory does."""
    params = inspect.signature(cls.__init__).parameters
    if "kv_cache_config" in params:
        return cls(config, role, kv_config)
    return cls(config, role)


def request(request_id: str) -> Any:
    """A real vLLM Request of ``PROMPT_TOKENS`` prompt tokens."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    return fill(
        Request,
        {
            "request_id": request_id,
            "prompt_token_ids": list(range(1, PROMPT_TOKENS + 1)),
            "sampling_params": SamplingParams(max_tokens=1),
            "pooling_params": None,
            "eos_token_id": None,
            "arrival_time": time.time(),
            "client_index": 0,
            "priority": 0,
        },
    )


def scheduler_output(req: Any, block_ids: list[int]) -> Any:
    """A SchedulerOutput that schedules ``req``'s whole prompt as a new request."""
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    new = NewRequestData.from_request(req, (block_ids,))
    empty: dict[str, Any] = {}
    for f in dataclasses.fields(SchedulerOutput):
        kind = str(f.type)
        if "CachedRequestData" in kind:
            empty[f.name] = CachedRequestData.make_empty()
        elif kind.startswith(("list", "List")):
            empty[f.name] = []
        elif kind.startswith(("dict", "Dict")):
            empty[f.name] = {}
        elif kind.startswith(("set", "Set")):
            empty[f.name] = set()
        elif kind.startswith("int"):
            empty[f.name] = 0
    empty |= {
        "scheduled_new_reqs": [new],
        "num_scheduled_tokens": {req.request_id: PROMPT_TOKENS},
        "total_num_scheduled_tokens": PROMPT_TOKENS,
    }
    return fill(SchedulerOutput, empty)


def round_trip(connector: Any, request_id: str) -> str:
    """One request through the scheduler side: lookup, allocation, metadata, finish."""
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    req = request(request_id)
    deadline = time.monotonic() + LOOKUP_SECONDS
    matched, load_async = connector.get_num_new_matched_tokens(req, 0)
    while matched is None:
        if time.monotonic() > deadline:
            msg = f"the lookup got no answer from the server in {LOOKUP_SECONDS:.0f} s"
            raise TimeoutError(msg)
        time.sleep(0.05)
        matched, load_async = connector.get_num_new_matched_tokens(req, 0)
    block_ids = list(range(PROMPT_TOKENS // BLOCK_SIZE))
    blocks = KVCacheBlocks(blocks=([KVCacheBlock(block_id=i) for i in block_ids],))
    connector.update_state_after_alloc(req, blocks, matched)
    meta = connector.build_connector_meta(scheduler_output(req, block_ids))
    connector.request_finished(req, block_ids)
    return f"lookup matched {matched} tokens (async {load_async}); metadata {type(meta).__name__}"


def build(cls: type, config: Any, kv_config: Any, request_id: str) -> dict[str, Any]:
    """Each step of a real build of ``cls``; the first error stops the remaining steps."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    steps: dict[str, Any] = {}
    scheduler = None
    try:
        scheduler = construct(cls, config, KVConnectorRole.SCHEDULER, kv_config)
        steps["constructs_scheduler"] = True
        worker = construct(cls, config, KVConnectorRole.WORKER, kv_config)
        steps["constructs_worker"] = True
        steps["round_trip"] = round_trip(scheduler, request_id)
        steps["scheduler_round_trip"] = True
        for connector in (worker, scheduler):
            getattr(connector, "shutdown", lambda: None)()
    except Exception as exc:
        step = next(s for s in STEPS if s not in steps)
        steps[step] = False
        steps["error"] = f"{step.replace('_', ' ')}: {error_text(exc)}"
    return steps


def candidate(module_name: str, class_name: str, base: type) -> tuple[dict[str, Any], Any]:
    """Import ``module_name.class_name`` and check it is a connector class."""
    info: dict[str, Any] = {"module": module_name, "imports": False, "subclass": False}
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        info["error"] = error_text(exc)
        return info, None
    info["imports"] = True
    cls = getattr(module, class_name, None)
    info["subclass"] = isinstance(cls, type) and issubclass(cls, base)
    if not info["subclass"]:
        info["error"] = f"{class_name} is {cls!r}, not a KVConnectorBase_V1 subclass"
        return info, None
    return info, cls


def diagnose(server: str | None, model_dir: str) -> dict[str, Any]:
    """Everything one layer's lmcache gives with this vLLM; built for real when ``server``."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    out: dict[str, Any] = {"vllm": version("vllm"), "lmcache": version("lmcache")}
    out["vllm_unmet"] = unmet("vllm") if out["vllm"] else []
    out["server"] = server
    found = [candidate(m, "LMCacheMPConnector", KVConnectorBase_V1) for m in lmcache_modules()]
    try:
        vllm_module = importlib.import_module(VLLM_MODULE)
    except Exception as exc:
        out["import_error"] = error_text(exc)
    else:
        patched = hasattr(vllm_module, "LMCacheMPConnectorUpstream")
        out["patched"] = patched
        builtin = "LMCacheMPConnectorUpstream" if patched else "LMCacheMPConnector"
        info, cls = candidate(VLLM_MODULE, builtin, KVConnectorBase_V1)
        info["builtin"] = True
        found.append((info, cls))
        chosen = vllm_module.LMCacheMPConnector
        out["chosen"] = f"{chosen.__module__}.{chosen.__qualname__}"
        out["resolution"] = dict(getattr(vllm_module, "LMCACHE_MP_CONNECTOR_RESOLUTION", {}))
        found.append(({"module": out["chosen"], "chosen": True}, chosen))
    out["candidates"] = [info for info, _ in found if not info.get("chosen")]
    if server is None:
        return out
    config = vllm_config(model_dir, server)
    kv_config = kv_cache_config(config)
    out["worker_limit"] = WORKER_LIMIT
    for index, (info, cls) in enumerate(found):
        if cls is not None:
            info.update(build(cls, config, kv_config, f"probe-{os.getpid()}-{index}"))
    out["chosen_build"] = found[-1][0] if "chosen" in out else {}
    return out


def per_layer(
    tag: str, layers: list[str | None], diagnose_one: Callable[[int], dict[str, Any]]
) -> None:
    """Import what every diagnosis shares once, then run ``diagnose_one(i)`` in a forked child
    with layer ``i`` first on ``sys.path``; each child prints ``TAG {json}`` (or ``FAILED``),
    the parent ``LAYER i exit code N``."""
    for shared in SHARED:
        importlib.import_module(shared)
    if any(name.split(".")[0] == "lmcache" for name in sys.modules):
        msg = "lmcache was imported before the layers were put on sys.path"
        raise RuntimeError(msg)
    for index, layer in enumerate(layers):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            if layer:
                sys.path.insert(0, layer)
                importlib.invalidate_caches()
            try:
                print(f"{tag} " + json.dumps(diagnose_one(index)), flush=True)
            except BaseException as exc:
                traceback.print_exc()
                print(f"FAILED {error_text(exc)}", flush=True)
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(f"LAYER {index} exit code {os.waitstatus_to_exitcode(status)}", flush=True)


def main(spec_path: str) -> None:
    """Import vLLM once, then build each layer's candidates in a forked child."""
    spec = json.loads(Path(spec_path).read_text())
    layers = spec["layers"]
    per_layer(
        "BUILD",
        [layer["path"] for layer in layers],
        lambda i: diagnose(layers[i]["server"], spec["model_dir"]),
    )


if __name__ == "__main__":
    main(sys.argv[1])
