"""vLLM's own scheduler loop driving a connector, with a real KV round trip on a CPU.

Imported by ``connector_build.py`` inside the interpreter that holds vLLM. The scheduler is
the installed release's own ``Scheduler``, built as that release's connector tests build it
(``tests/v1/kv_connector/unit/utils.py`` from its sdist, loaded by path); the worker role of
the same class runs in the same process, and what it reports goes back to the scheduler as
the model runner's output, step after step:

- two waves of requests with real block hashes sharing a prefix of two lmcache chunks,
  64-token chunked prefill, decode, a KV pool small enough that the scheduler preempts and
  resumes, and the connector's delayed free of finished requests;
- the first wave writes a known value per token into its CPU KV blocks (the only part of a
  forward pass a connector sees); the second must get hit tokens from the lookup, load them,
  and end up with blocks equal to those values;
- on every step, each load or store the connector asks of the worker names only blocks its
  request holds, and the connector's blocks for a request equal the scheduler's; at the end
  nothing is held (vLLM's own ``assert_scheduler_empty``).

A CUDA event on a CPU is the one stand-in (an event that is already complete); it is used
only where the connector asks for one and then named in the result.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import time
import traceback
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from serving import (
    Hang,
    _short_path,
    bounded,
    clip,
    error_text,
    fill,
    needs_device,
    replaced,
    transfer_config,
)

BLOCK_SIZE = 16
CHUNK_TOKENS = 64
NUM_BLOCKS = 80
PREFIX_TOKENS = 512
PROMPT_TOKENS = 544
WAVES = ((4, 160), (2, 16))
"""Each wave: how many requests, how many new tokens each (the prompt is the same length)."""
NUM_KV_HEADS, HEAD_SIZE = 4, 16
LOOP_SECONDS = 150.0
"""The bound on the whole loop (each call inside is bounded by ``serving.STEP_SECONDS``)."""
IDLE_SECONDS = 20.0
"""How long the loop may schedule nothing while requests wait before it is a hang."""
MAX_STEPS = 3000
VERDICTS = ("serves", "raises", "hangs", "wrong blocks", "leaks", "unverified")
"""What the loop ends in: the first that applies, in the order an engine meets them."""


class Raised(Exception):
    """A call of the loop raised: which step, which call, where."""

    def __init__(self, step: int, call: str, exc: BaseException) -> None:
        super().__init__(f"step {step}: {call}: {error_text(exc)} ({innermost(exc)})")
        self.step, self.call, self.exc = step, call, exc


class WrongBlocks(Exception):
    """A request's blocks disagree between the connector, the scheduler or the bytes."""


def innermost(exc: BaseException) -> str:
    """``file:line in func`` of the frame that raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "no frame"
    last = frames[-1]
    return f"{_short_path(last.filename)}:{last.lineno} in {last.name}"


@functools.cache
def load_utils(path: str) -> ModuleType:
    """The release's ``tests/v1/kv_connector/unit/utils.py``, loaded by path once per process
    (it registers test connectors with vLLM's factory, which refuses a name twice)."""
    spec = importlib.util.spec_from_file_location("vllm_kv_connector_unit_utils", path)
    if spec is None or spec.loader is None:
        msg = f"cannot load {path}"
        raise ImportError(msg)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_config(utils: ModuleType, model_dir: str, server: str) -> Any:
    """The helper's VllmConfig for a local model (no tokenizer files here), prefix caching
    off (every hit is the connector's), one step's output fed back before the next.

    The helper is given the connector as serving names it, so that vLLM's own config checks
    decide as they would there (vLLM 0.33 turns the hybrid KV cache manager off for a
    connector without HMA support; built for the helper's default NixlConnector, the
    scheduler then refuses LMCacheMPConnector).
    """
    transfer = transfer_config(server)
    real = utils.ModelConfig
    utils.ModelConfig = functools.partial(real, skip_tokenizer_init=True)
    try:
        config = fill(
            utils.create_vllm_config,
            {
                "model": model_dir,
                "max_num_batched_tokens": CHUNK_TOKENS,
                "block_size": BLOCK_SIZE,
                "kv_connector": transfer.kv_connector,
                "kv_role": transfer.kv_role,
                "kv_connector_extra_config": transfer.kv_connector_extra_config,
            },
        )
    finally:
        utils.ModelConfig = real
    config.kv_transfer_config = transfer
    config.cache_config.enable_prefix_caching = False
    if hasattr(config.scheduler_config, "async_scheduling"):
        config.scheduler_config.async_scheduling = False
    return config


def kv_cache_config(config: Any) -> tuple[Any, list[str]]:
    """One full-attention group over the model's real layer names, float32 on the CPU."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    layers = config.model_config.get_num_layers(config.parallel_config)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    spec = fill(
        FullAttentionSpec,
        {
            "block_size": BLOCK_SIZE,
            "num_kv_heads": NUM_KV_HEADS,
            "head_size": HEAD_SIZE,
            "dtype": torch.float32,
            "use_mla": False,
            "sliding_window": None,
        },
    )
    group = fill(KVCacheGroupSpec, {"layer_names": names, "kv_cache_spec": spec})
    kv_config = fill(
        KVCacheConfig,
        {"num_blocks": NUM_BLOCKS, "kv_cache_tensors": [], "kv_cache_groups": [group]},
    )
    return kv_config, names


def token_value(token: int, position: int) -> float:
    """What the stand-in forward pass writes for a token: nonzero, unique enough to see a
    block loaded from the wrong place."""
    return float((token * 31 + position * 7) % 4093 + 1)


class CpuEvent:
    """The one stand-in: a CUDA event on a CPU, already complete."""

    def record(self, *args: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def wait(self, *args: Any) -> None:
        return None


def cuda_event_stand_in() -> contextlib.AbstractContextManager[None]:
    """``torch.cuda.Event``/``stream``/``current_stream`` for a CPU, for the loop only."""
    import torch

    return replaced(
        torch.cuda,
        {
            "Event": lambda *a, **k: CpuEvent(),
            "stream": lambda *a, **k: contextlib.nullcontext(),
            "current_stream": lambda *a, **k: None,
        },
    )


def flat_blocks(block_ids: Any) -> list[int]:
    """Block ids of one group, whether lmcache or vLLM nest them per group or not."""
    if isinstance(block_ids, dict):
        block_ids = block_ids.get(0, [])
    if isinstance(block_ids, tuple | list) and block_ids and isinstance(block_ids[0], list):
        block_ids = block_ids[0]
    return [int(b) for b in block_ids or []]


class Loop:
    """One engine loop: the scheduler with the connector's scheduler role, and its worker."""

    def __init__(self, utils: ModuleType, config: Any, cls: type, construct: Callable) -> None:
        import torch

        self.utils, self.config, self.cls = utils, config, cls
        self.kv_config, self.layers = kv_cache_config(config)
        self.construct = construct
        self.torch = torch
        self.step = 0
        self.report: dict[str, Any] = {"steps": 0, "preemptions": 0, "delayed_frees": 0}
        self.caches: dict[str, Any] = {}
        self.registered = ""
        self.checked_loads: dict[str, int] = {}
        self.expected_hits: set[str] = set()

    def call(self, what: str, body: Callable[[], Any]) -> Any:
        """``body()`` as one bounded call of this step; a raise names step, call, frame."""
        try:
            with bounded(f"step {self.step}: {what}"):
                return body()
        except Hang:
            raise
        except Exception as exc:
            raise Raised(self.step, what, exc) from exc

    def start(self) -> None:
        """The scheduler (which builds the connector's scheduler role through vLLM's
        factory), then the worker role with CPU KV caches registered."""
        utils = self.utils
        self.scheduler = self.call(
            "create_scheduler",
            lambda: fill(
                utils.create_scheduler,
                {
                    "vllm_config": self.config,
                    "num_blocks": NUM_BLOCKS,
                    "kv_cache_config": self.kv_config,
                },
            ),
        )
        self.connector = self.scheduler.connector
        self.worker = self.call(
            "construct worker",
            lambda: self.construct(self.cls, self.config, "WORKER", self.kv_config),
        )
        shape = (2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
        self.caches = {n: self.torch.zeros(shape, dtype=self.torch.float32) for n in self.layers}
        try:
            with bounded(f"step {self.step}: register_kv_caches"):
                self.worker.register_kv_caches(self.caches)
        except Hang:
            raise
        except Exception as exc:
            device = needs_device(exc)
            if not device:
                raise Raised(self.step, "register_kv_caches", exc) from exc
            self.registered = (
                f"not possible on a CPU: register_kv_caches needs CUDA at {device} "
                f"({type(exc).__name__})"
            )

    def requests(self, wave: int, count: int, new_tokens: int) -> list[Any]:
        """``count`` requests made by the release's own helper, sharing the prefix."""
        made = []
        for i in range(count):
            rid = 100 * (wave + 1) + i
            req = fill(
                self.utils.create_request,
                {
                    "request_id": rid,
                    "num_tokens": PROMPT_TOKENS,
                    "common_prefix_len": PREFIX_TOKENS,
                    "max_tokens": new_tokens,
                    "block_size": BLOCK_SIZE,
                },
            )
            made.append(req)
        return made

    def run(self, waves: tuple[tuple[int, int], ...] = WAVES) -> None:
        deadline = time.monotonic() + LOOP_SECONDS
        for wave, (count, new_tokens) in enumerate(waves):
            for req in self.requests(wave, count, new_tokens):
                self.call("add_request", lambda req=req: self.scheduler.add_request(req))
                if wave > 0 and not self.registered:
                    self.expected_hits.add(req.request_id)
            self.until_idle(deadline)
        self.finish()

    def until_idle(self, deadline: float) -> None:
        idle_since = time.monotonic()
        while self.scheduler.requests:
            if time.monotonic() > deadline or self.step >= MAX_STEPS:
                msg = (
                    f"the loop did not finish its requests in {LOOP_SECONDS:.0f} s "
                    f"({self.step} steps); waiting: {sorted(self.scheduler.requests)}"
                )
                raise Hang(msg)
            self.step += 1
            scheduled = self.one_step()
            if scheduled:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > IDLE_SECONDS:
                msg = (
                    f"step {self.step}: nothing scheduled for {IDLE_SECONDS:.0f} s while "
                    f"{sorted(self.scheduler.requests)} wait"
                )
                raise Hang(msg)
            else:
                time.sleep(0.01)

    def one_step(self) -> int:
        """Schedule, check, run the worker, write the tokens, feed the output back."""
        sched = self.scheduler
        out = self.call("schedule", sched.schedule)
        self.report["steps"] = self.step
        meta = getattr(out, "kv_connector_metadata", None)
        self.check_metadata(meta)
        self.check_trackers(out)
        worker = self.worker
        if meta is not None:
            self.call("bind_connector_metadata", lambda: worker.bind_connector_metadata(meta))
        self.call("start_load_kv", lambda: worker.start_load_kv(self.forward_context()))
        for layer in self.layers:
            self.call("wait_for_layer_load", lambda layer=layer: worker.wait_for_layer_load(layer))
        self.check_loaded(out)
        self.forward(out)
        self.call("wait_for_save", worker.wait_for_save)
        finished = set(getattr(out, "finished_req_ids", set()))
        sending, recving = self.call("get_finished", lambda: worker.get_finished(finished))
        self.call("clear_connector_metadata", worker.clear_connector_metadata)
        preempted = getattr(out, "preempted_req_ids", None)
        if preempted:
            self.report["preemptions"] += len(preempted)
        output = self.model_output(out, sending, recving)
        held_before = set(sched.requests)
        self.call("update_from_output", lambda: sched.update_from_output(out, output))
        self.report["delayed_frees"] += len(set(sending or ()) & held_before)
        return int(getattr(out, "total_num_scheduled_tokens", 0))

    def forward_context(self) -> Any:
        from vllm.forward_context import ForwardContext

        return fill(
            ForwardContext,
            {"no_compile_layers": {}, "attn_metadata": {}, "slot_mapping": {}, "virtual_engine": 0},
        )

    def block_ids(self, rid: str) -> list[int]:
        return flat_blocks(self.scheduler.kv_cache_manager.get_block_ids(rid))

    def scheduled(self, out: Any) -> Iterator[tuple[str, int, int]]:
        """(request, first position computed this step, tokens computed this step); the
        scheduler has already counted this step's tokens as computed."""
        for rid, tokens in out.num_scheduled_tokens.items():
            req = self.scheduler.requests[rid]
            yield rid, req.num_computed_tokens - tokens, tokens

    def forward(self, out: Any) -> None:
        """The stand-in for attention writing K and V: a known value per token position."""
        for rid, first, tokens in self.scheduled(out):
            req = self.scheduler.requests[rid]
            blocks = self.block_ids(rid)
            ids = req.all_token_ids
            for pos in range(first, first + tokens):
                value = token_value(ids[pos], pos)
                block, slot = blocks[pos // BLOCK_SIZE], pos % BLOCK_SIZE
                for cache in self.caches.values():
                    cache[:, block, slot] = value

    def check_loaded(self, out: Any) -> None:
        """A request scheduled as new with tokens already computed got them from the
        connector (vLLM's prefix cache is off): its blocks must hold their values."""
        for new in out.scheduled_new_reqs:
            rid, first = new.req_id, new.num_computed_tokens
            req = self.scheduler.requests[rid]
            if first == 0 or req.num_output_tokens or not self.caches:
                continue  # nothing loaded, or resumed after decoding (recomputed)
            self.checked_loads.setdefault(rid, first)
            blocks = flat_blocks(new.block_ids)
            cache = next(iter(self.caches.values()))
            for pos in range(first):
                want = token_value(req.all_token_ids[pos], pos)
                got = cache[:, blocks[pos // BLOCK_SIZE], pos % BLOCK_SIZE]
                if not bool((got == want).all()):
                    msg = (
                        f"step {self.step}: {rid} got {first} tokens from the connector, but "
                        f"token {pos} holds {float(got.flatten()[0])}, not {want}"
                    )
                    raise WrongBlocks(msg)

    def check_metadata(self, meta: Any) -> None:
        """Every load or store names only blocks its request holds at this step."""
        for item in getattr(meta, "requests", None) or []:
            op = getattr(item, "op", None)
            rid = getattr(item, "request_id", None)
            if op is None or rid is None or not hasattr(op, "block_ids"):
                continue
            asked = set(flat_blocks(op.block_ids))
            held = set(self.block_ids(rid)) if rid in self.scheduler.requests else set()
            if not asked <= held:
                direction = getattr(item, "direction", "load or store")
                msg = (
                    f"step {self.step}: the connector asks a {direction} of {rid} in blocks "
                    f"{sorted(asked - held)}, which the scheduler does not give it"
                )
                raise WrongBlocks(msg)

    def check_trackers(self, out: Any) -> None:
        """The connector's blocks for each request scheduled now equal the scheduler's."""
        trackers = getattr(self.connector, "request_trackers", None)
        if not isinstance(trackers, dict):
            return
        for rid in out.num_scheduled_tokens:
            tracker = trackers.get(rid)
            if tracker is None or not hasattr(tracker, "allocated_block_ids"):
                continue
            mine = flat_blocks(tracker.allocated_block_ids)
            theirs = self.block_ids(rid)
            if mine != theirs[: len(mine)] or len(mine) < len(theirs):
                msg = (
                    f"step {self.step}: the connector tracks blocks {mine} for {rid}, the "
                    f"scheduler gave it {theirs}"
                )
                raise WrongBlocks(msg)

    def model_output(self, out: Any, sending: Any, recving: Any) -> Any:
        """The helper's ModelRunnerOutput, one token sampled only where the prompt is done."""
        sched = self.scheduler
        reqs = [sched.requests[rid] for rid in out.num_scheduled_tokens]
        output = fill(
            self.utils.create_model_runner_output,
            {
                "reqs": reqs,
                "finished_sending": set(sending or ()),
                "finished_recving": set(recving or ()),
                "token_id": 7,
            },
        )
        sampled = []
        for req in reqs:
            sampled.append([7] if req.num_computed_tokens >= req.num_prompt_tokens else [])
        output.sampled_token_ids = sampled
        return output

    def finish(self) -> None:
        """The round trip's outcome, then vLLM's own check that nothing is left held."""
        missed = sorted(self.expected_hits - set(self.checked_loads))
        self.report["hit"] = bool(self.expected_hits) and not missed
        if missed:
            self.report["round_trip"] = (
                f"no hit: {missed[0]} of the second wave got nothing from the connector"
            )
        elif self.expected_hits:
            hits = sorted(self.checked_loads[r] for r in self.expected_hits)
            self.report["round_trip"] = (
                f"{len(hits)} requests of the second wave loaded {hits[0]} to {hits[-1]} of "
                f"{PROMPT_TOKENS} prompt tokens, every one equal to what the first wave wrote"
            )
        else:
            self.report["round_trip"] = self.registered
        # The scheduler forgets finished requests at the end of its next schedule().
        self.call("schedule", self.scheduler.schedule)
        try:
            self.utils.assert_scheduler_empty(self.scheduler)
        except AssertionError as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            self.report["leaks"] = f"assert_scheduler_empty: {frame.line}"

    def close(self) -> None:
        for role in ("worker", "connector"):
            connector = getattr(self, role, None)
            if connector is not None and callable(getattr(connector, "shutdown", None)):
                with contextlib.suppress(Exception, Hang), bounded(f"{role} shutdown"):
                    connector.shutdown()


def engine_loop(
    cls: type,
    vllm_module: Any,
    utils_path: str,
    model_dir: str,
    server: str,
    construct: Callable,
) -> dict[str, Any]:
    """Drive ``cls`` as the class ``LMCacheMPConnector`` names through the loop.

    :returns: ``verdict`` (one of :data:`VERDICTS`), ``detail``, ``step`` (where it raised),
        ``steps``, ``preemptions``, ``delayed_frees``, ``round_trip``, ``stand_in``.
    """
    result = _loop_once(cls, vllm_module, utils_path, model_dir, server, construct, False)
    if result.pop("needs_cuda", False):
        again = _loop_once(cls, vllm_module, utils_path, model_dir, server, construct, True)
        again["stand_in"] = (
            f"a completed CPU event in place of torch.cuda.Event (without it: {result['detail']})"
        )
        return again
    return result


def _loop_once(
    cls: type,
    vllm_module: Any,
    utils_path: str,
    model_dir: str,
    server: str,
    construct: Callable,
    stand_in: bool,
) -> dict[str, Any]:
    from vllm.config import set_current_vllm_config

    started = time.monotonic()
    saved = vllm_module.LMCacheMPConnector
    loop: Loop | None = None
    result: dict[str, Any] = {}
    try:
        utils = load_utils(utils_path)
        config = make_config(utils, model_dir, server)
        vllm_module.LMCacheMPConnector = cls  # what vLLM's factory will find under the name
        guard = cuda_event_stand_in() if stand_in else contextlib.nullcontext()
        with guard, set_current_vllm_config(config), bounded("the engine loop", LOOP_SECONDS):
            loop = Loop(utils, config, cls, construct)
            loop.start()
            loop.run()
        result = dict(loop.report)
        # A second wave without a hit is said, not judged here: some lmcache servers look up
        # only KV registered by their GPU transfer (0.5.4 logs "No GPU context found").
        result["verdict"] = "leaks" if "leaks" in result else "serves"
        result["detail"] = result.get("leaks") or result.get("round_trip", "")
    except Raised as raised:
        device = needs_device(raised.exc)
        result = dict(loop.report) if loop else {}
        result.update(
            verdict="unverified" if device else "raises",
            step=raised.step,
            detail=clip(str(raised)),
            needs_cuda=bool(device) and not stand_in,
        )
    except WrongBlocks as wrong:
        result = dict(loop.report) if loop else {}
        result.update(verdict="wrong blocks", detail=clip(str(wrong)))
    except Hang as hang:
        result = dict(loop.report) if loop else {}
        result.update(verdict="hangs", detail=clip(str(hang)))
    except Exception as exc:  # the helper or the config: the loop could not be set up
        text = f"not set up: {error_text(exc)} ({innermost(exc)})"
        result = {"verdict": "unverified", "detail": clip(text)}
    finally:
        vllm_module.LMCacheMPConnector = saved
        if loop is not None:
            loop.close()
    result["seconds"] = round(time.monotonic() - started, 1)
    return result
