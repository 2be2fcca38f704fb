"""Build LMCacheMPConnector candidates for real, inside the interpreter that holds vLLM.

Run by path with that interpreter (it imports only the standard library, vLLM and lmcache)::

    PY connector_build.py SPEC.json

``SPEC.json`` holds ``layers`` (a list of ``{"path": DIR | null, "server": URL | null}``),
``model_dir`` (a directory holding a model's ``config.json``) and ``geometry_only``. vLLM is
imported once; a child is forked per layer, which puts the layer first on ``sys.path`` (an
lmcache release installed alone), imports lmcache from it and prints one ``BUILD {json}``
line: versions, the class ``LMCacheMPConnector`` resolves to, and every candidate's steps as
a serving engine takes them (``serving.STEPS``): both roles constructed against
the server, a request with real block hashes through the scheduler, the worker driven with
the scheduler's metadata, and the TP 2 geometry; each step bounded, a hang is a verdict.
Without a server: imports, subclass, and whether each role constructs with nothing listening
(``geometry_only``: imports, subclass and the geometry). The parent prints ``LAYER i exit code N``.

Its reader is ``diagnosis/live.py``, typed there as ``LayerBuild``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata as md
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

# Run by path, this file's directory is first on sys.path: its siblings import as modules.
from engine_loop import engine_loop
from serving import (
    NOT_ON_A_CPU,
    RANK,
    TP_SIZE,
    WATCHDOG,
    Hang,
    block_hasher,
    bounded,
    drive_worker,
    error_text,
    fill,
    geometry,
    hashed_request,
    takes_kv_cache_config,
    transfer_config,
    verdict,
)

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


def version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


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


def resolution(module: Any) -> dict[str, str]:
    """The class the series' ``_choose_lmcache_mp_connector()`` in ``module`` picks, and why;
    ``{}`` for a module without it (vLLM unpatched)."""
    choose = getattr(module, "_choose_lmcache_mp_connector", None)
    if choose is None:
        return {}
    cls, reason = choose()
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "reason": reason}


def vllm_config(model_dir: str, server: str) -> Any:
    """A real VllmConfig for a tiny local model, CPU device, the connector pointed at ``server``."""
    from vllm.config import DeviceConfig, ModelConfig, VllmConfig

    transfer = transfer_config(server)
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


def construct(cls: type, config: Any, role_name: str, kv_config: Any) -> Any:
    """Construct ``cls`` for the role ``role_name`` (``SCHEDULER``, ``WORKER``) as vLLM's
    connector factory does."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    role = getattr(KVConnectorRole, role_name)
    if takes_kv_cache_config(cls):
        return cls(config, role, kv_config)
    return cls(config, role)


def scheduler_output(req: Any, block_ids: list[int]) -> Any:
    """A SchedulerOutput that schedules ``req``'s whole prompt as a new request."""
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    new = fill(
        NewRequestData.from_request,
        {"request": req, "block_ids": (block_ids,), "prefill_token_ids": req.prompt_token_ids},
    )
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


def lookup(connector: Any, req: Any) -> tuple[int, bool]:
    """The scheduler's lookup, polled while the connector answers "not ready yet"."""
    deadline = time.monotonic() + LOOKUP_SECONDS
    with bounded("scheduler get_num_new_matched_tokens"):
        matched, load_async = connector.get_num_new_matched_tokens(req, 0)
        while matched is None:
            if time.monotonic() > deadline:
                msg = (
                    "scheduler get_num_new_matched_tokens answered 'not ready' for "
                    f"{LOOKUP_SECONDS:.0f} s"
                )
                raise Hang(msg)
            time.sleep(0.05)
            matched, load_async = connector.get_num_new_matched_tokens(req, 0)
    return matched, load_async


def schedule(connector: Any, req: Any) -> tuple[Any, list[int], str]:
    """The scheduler's side of one engine step for ``req``: lookup, allocation, metadata."""
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    matched, load_async = lookup(connector, req)
    block_ids = list(range(PROMPT_TOKENS // BLOCK_SIZE))
    blocks = KVCacheBlocks(blocks=([KVCacheBlock(block_id=i) for i in block_ids],))
    with bounded("scheduler update_state_after_alloc"):
        connector.update_state_after_alloc(req, blocks, matched)
    with bounded("scheduler build_connector_meta"):
        meta = connector.build_connector_meta(scheduler_output(req, block_ids))
    text = (
        f"lookup with {len(req.block_hashes)} block hashes matched {matched} tokens "
        f"(async {load_async}); metadata {type(meta).__name__}"
    )
    return meta, block_ids, text


class Build:
    """One candidate built as a serving engine uses it; each step recorded in ``info``."""

    def __init__(self, cls: type, config: Any, kv_config: Any, info: dict[str, Any]) -> None:
        self.cls, self.config, self.kv_config, self.info = cls, config, kv_config, info

    def step(self, name: str, body: Callable[[], Any]) -> Any:
        """``body()`` as step ``name``; a failure or hang is recorded (the first is the error)."""
        try:
            with bounded(name.replace("_", " ")):
                value = body()
        except Hang as hang:
            self.failed(name, f"hangs: {hang}", hangs=True)
        except Exception as exc:
            self.failed(name, error_text(exc))
        else:
            self.info.setdefault(name, True)
            return value
        return None

    def failed(self, name: str, text: str, *, hangs: bool = False) -> None:
        self.info[name] = False
        self.info.setdefault("errors", {}).setdefault(name, text)
        if hangs:
            self.info.setdefault("hangs", f"{name.replace('_', ' ')}: {text}")
        self.info.setdefault("error", f"{name.replace('_', ' ')}: {text}")

    def role(self, name: str) -> Any:
        return construct(self.cls, self.config, name, self.kv_config)

    def run(self, request_id: str) -> None:
        """Scheduler, worker, the request's lifecycle between them, shutdown, geometry."""
        info = self.info
        hasher = block_hasher(self.config)
        prompt = list(range(1, PROMPT_TOKENS + 1))
        req = hashed_request(request_id, prompt, hasher, fill)
        info["block_hashes"] = len(req.block_hashes)
        scheduler = self.step("constructs_scheduler", lambda: self.role("SCHEDULER"))
        scheduled = None
        if scheduler is not None:
            scheduled = self.step("scheduler_round_trip", lambda: schedule(scheduler, req))
        worker = self.step("constructs_worker", lambda: self.role("WORKER"))
        if worker is not None and scheduled is not None:
            self.drive(worker, scheduled[0])
        elif worker is not None:
            info["worker_driven"] = False
            info["worker"] = {"bind_connector_metadata": "not run: the scheduler built no metadata"}
        if scheduled is not None and info.get("scheduler_round_trip"):
            self.finish(scheduler, req, scheduled, prompt, hasher, request_id)
        for name, connector in (("worker", worker), ("scheduler", scheduler)):
            if connector is not None and "hangs" not in info:
                self.shutdown(name, connector)
        info["geometry_detail"] = geometry(
            lambda cfg: construct(self.cls, cfg, "WORKER", self.kv_config), self.config
        )
        ok = info["geometry_detail"]["ok"]
        info["geometry"] = ok
        if ok is False:
            info["geometry_error"] = geometry_error(info["geometry_detail"])
        elif ok is None:
            info.setdefault("error", "geometry: " + geometry_error(info["geometry_detail"]))

    def drive(self, worker: Any, metadata: Any) -> None:
        """The worker's calls of the engine step that scheduled the request."""
        try:
            done = drive_worker(worker, metadata, fill)
        except Hang as hang:
            self.failed("worker_driven", f"hangs: {hang}", hangs=True)
            return
        self.info["worker"] = done
        failed = [f"{call}: {state}" for call, state in done.items() if state.startswith("failed")]
        if failed:
            self.failed("worker_driven", failed[0].replace("failed: ", ""))
        else:
            self.info["worker_driven"] = True

    def finish(
        self, scheduler: Any, req: Any, scheduled: Any, prompt: list[int], hasher: Any, rid: str
    ) -> None:
        """The request finishes; a second request with the same prompt is looked up."""
        _, block_ids, text = scheduled
        self.step("scheduler_round_trip", lambda: scheduler.request_finished(req, block_ids))
        if not self.info.get("scheduler_round_trip"):
            return
        self.info["round_trip"] = text
        again = hashed_request(f"{rid}-again", prompt, hasher, fill)
        try:
            matched, _ = lookup(scheduler, again)
        except Hang as hang:
            self.info["second_lookup"] = f"hangs: {hang}"
        except Exception as exc:
            self.info["second_lookup"] = f"failed: {error_text(exc)}"
        else:
            self.info["second_lookup"] = (
                f"the same {PROMPT_TOKENS}-token prompt again matched {matched} tokens"
            )

    def shutdown(self, name: str, connector: Any) -> None:
        if not callable(getattr(connector, "shutdown", None)):
            return
        try:
            with bounded(f"{name} shutdown"):
                connector.shutdown()
        except Hang as hang:
            self.failed("worker_driven", f"hangs: {hang}", hangs=True)
        except Exception as exc:
            self.info.setdefault("worker", {})[f"{name} shutdown"] = f"failed: {error_text(exc)}"
            self.failed("worker_driven", f"{name} shutdown: {error_text(exc)}")
        else:
            self.info.setdefault("worker", {})[f"{name} shutdown"] = "ran"


def geometry_error(detail: dict[str, Any]) -> str:
    """The first mismatch of a geometry check, in words; else why nothing was handed over."""
    for key, got in detail.items():
        if isinstance(got, dict) and got.get("ok") is False:
            return (
                f"rank {RANK} of TP {TP_SIZE}, {key}: sent {got['sent']}, "
                f"expected {got['expected']}"
            )
    for key, got in detail.items():
        if isinstance(got, dict) and "error" in got:
            return f"rank {RANK} of TP {TP_SIZE}, {key}: not measured: {got['error']}"
    return ""


def build(
    cls: type,
    config: Any,
    kv_config: Any,
    request_id: str,
    info: dict[str, Any],
    loop: Callable[[type], dict[str, Any]] | None,
) -> None:
    """Every step of a real build of ``cls`` into ``info``, then vLLM's scheduler loop
    (``loop``, where the release's test helpers are given) for a class that passed every one
    of them, then its ``verdict``."""
    started = time.monotonic()
    Build(cls, config, kv_config, info).run(request_id)
    if loop is not None and verdict(info) == "works":
        info["engine_loop"] = loop(cls)
    info["verdict"] = verdict(info)
    info["seconds"] = round(time.monotonic() - started, 1)


def builtin_name(vllm_module: Any) -> str:
    """The name of vLLM's own class in its connector module: ``LMCacheMPConnectorUpstream``
    where a resolution (the series, or vLLM 0.22.0's) gives ``LMCacheMPConnector`` another."""
    if hasattr(vllm_module, "LMCacheMPConnectorUpstream"):
        return "LMCacheMPConnectorUpstream"
    return "LMCacheMPConnector"


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


def scheduler_loop(
    vllm_module: Any, test_utils: str, model_dir: str, server: str
) -> Callable[[type], dict[str, Any]]:
    """``engine_loop`` of one class with vLLM's own scheduler, from the release's helpers."""
    return functools.partial(
        engine_loop,
        vllm_module=vllm_module,
        utils_path=test_utils,
        model_dir=model_dir,
        server=server,
        construct=construct,
    )


NO_SERVER = "tcp://127.0.0.1:1"
"""Where a run without a server points the connector (nothing listens there): the geometry
build stops before connecting, and ``construct_alone`` records what constructing does."""
ALONE_SECONDS = 5.0
"""The bound on constructing a role with nothing listening: a refusal before connecting comes at
once; a constructor that waits for its server (lmcache 0.4.4 and 0.4.5's) tells nothing more."""


def construct_alone(cls: type, config: Any, kv_config: Any, info: dict[str, Any]) -> None:
    """Without a server: construct each role pointed at :data:`NO_SERVER` (nothing listens
    there) and record the first refusal in ``without_server`` and ``error``. A refusal that
    comes before connecting (the series' check of lmcache's adapter API) is a finding about
    the cell; the reader decides which refusals are."""
    for role in ("SCHEDULER", "WORKER"):
        name = role.lower()
        try:
            with bounded(f"{name} constructs without a server", ALONE_SECONDS):
                construct(cls, config, role, kv_config)
        except Hang as hang:
            info["without_server"] = f"the {name} hangs: {hang}"
            return
        except Exception as exc:
            info["without_server"] = f"the {name} raises {error_text(exc)}"
            info["error"] = f"constructs {name}: {error_text(exc)}"
            return
    info["without_server"] = "both roles construct"


def build_each(
    out: dict[str, Any],
    found: list[tuple[dict[str, Any], Any]],
    build_one: Callable[[int, dict[str, Any], type], None],
) -> None:
    """``build_one(index, info, cls)`` for every class found, each class once (the chosen
    class is one of the candidates, and takes its build)."""
    built: dict[type, dict[str, Any]] = {}
    for index, (info, cls) in enumerate(found):
        if cls in built:
            info.update({k: v for k, v in built[cls].items() if k not in ("module", "builtin")})
        elif cls is not None:
            WATCHDOG.partial = ("BUILD", out, info)
            build_one(index, info, cls)
            built[cls] = info
    WATCHDOG.partial = None


def diagnose(
    server: str | None,
    model_dir: str,
    *,
    geometry_only: bool = False,
    test_utils: str | None = None,
) -> dict[str, Any]:
    """Everything one layer's lmcache gives with this vLLM; built for real when ``server``
    (and driven through vLLM's scheduler loop where ``test_utils``, the release's own
    ``tests/v1/kv_connector/unit/utils.py``, is given), only the geometry of each candidate
    when ``geometry_only`` (no server needed); without a server, each candidate's roles are
    only constructed (``construct_alone``)."""
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
        out["patched"] = hasattr(vllm_module, "_choose_lmcache_mp_connector")
        info, cls = candidate(VLLM_MODULE, builtin_name(vllm_module), KVConnectorBase_V1)
        info["builtin"] = True
        found.append((info, cls))
        chosen = vllm_module.LMCacheMPConnector
        out["chosen"] = f"{chosen.__module__}.{chosen.__qualname__}"
        out["resolution"] = resolution(vllm_module)
        found.append(({"module": out["chosen"], "chosen": True}, chosen))
    out["candidates"] = [info for info, _ in found if not info.get("chosen")]
    if server is None and all(cls is None for _, cls in found):
        return out  # nothing imports (a config naming the connector may not even be valid)
    config = vllm_config(model_dir, server or NO_SERVER)
    kv_config = kv_cache_config(config)
    if geometry_only:
        for info, cls in found:
            if cls is not None:
                info["geometry_detail"] = geometry(
                    lambda cfg, cls=cls: construct(cls, cfg, "WORKER", kv_config), config
                )
        return out
    if server is None:
        build_each(out, found, lambda _, info, cls: construct_alone(cls, config, kv_config, info))
    else:
        out["not_on_a_cpu"] = NOT_ON_A_CPU
        out["geometry_of"] = f"rank {RANK} of tensor-parallel size {TP_SIZE}"
        given = test_utils and "import_error" not in out
        loop = scheduler_loop(vllm_module, test_utils, model_dir, server) if given else None
        out["engine_loop"] = bool(loop)
        build_each(
            out,
            found,
            lambda i, info, cls: build(
                cls, config, kv_config, f"probe-{os.getpid()}-{i}", info, loop
            ),
        )
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
        lambda i: diagnose(
            layers[i]["server"],
            spec["model_dir"],
            geometry_only=spec.get("geometry_only", False),
            test_utils=spec.get("test_utils"),
        ),
    )


if __name__ == "__main__":
    main(sys.argv[1])
