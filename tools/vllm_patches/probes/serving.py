"""What a serving engine asks of a connector, driven as far as a CPU allows.

Imported by ``connector_build.py`` inside the interpreter that holds vLLM. Every step runs
under a bound (:func:`bounded`): a step that does not return is a :class:`Hang` naming the
frame it blocked in, never a wait without end.

- :func:`hashed_request`: a request as vLLM's engine core makes it when a KV connector is
  configured, with real block hashes from vLLM's own hasher.
- :func:`drive_worker`: the worker's calls of one engine step with the scheduler's metadata;
  a call that stops at the accelerator is "not run here" with the reason, any other error
  fails the step.
- :func:`geometry`: the parallel description a worker of rank 1 in tensor-parallel size 2
  hands to lmcache, MLA off and on, compared with what that worker must send.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

STEP_SECONDS = 30.0
"""The bound on each step: construction, lookup, each worker call, a geometry build."""
GRACE_SECONDS = 15.0
"""After the bound, how long a step blocked where no signal reaches it may still run before
the watchdog ends the process with what was measured so far."""
STEPS = (
    "constructs_scheduler",
    "scheduler_round_trip",
    "constructs_worker",
    "worker_driven",
    "geometry",
)
"""What a real build measures, in order; ``works`` needs every one of them."""
TP_SIZE, RANK = 2, 1
"""The worker whose geometry is checked: rank 1 of tensor-parallel size 2, one PP stage."""
WORKER_CALLS = (
    "bind_connector_metadata",
    "start_load_kv",
    "wait_for_save",
    "get_finished",
    "clear_connector_metadata",
)
NOT_ON_A_CPU = {
    "register_kv_caches": (
        "not run here: it hands the server the accelerator's KV cache memory (CUDA IPC), "
        "which a CPU does not have; every later call runs with no KV cache registered"
    ),
    "save_kv_layer": "not run here: it needs a model forward pass on the accelerator",
    "wait_for_layer_load": "not run here: it needs a model forward pass on the accelerator",
}
"""Worker calls no CPU can make, and why (said in every report, never skipped silently)."""


class Hang(BaseException):
    """A step did not return within its bound (a BaseException: no ``except Exception`` in the
    connector swallows it)."""


def _short_path(path: str) -> str:
    """``lmcache/…/x.py`` for a file of an installed package or an lmcache layer."""
    for marker in ("site-packages/", "lmcache-layers/lmcache-"):
        if marker in path:
            rest = path.split(marker, 1)[1]
            return rest.split("/", 1)[1] if marker.endswith("-") else rest
    return Path(path).name


def frames_text(frame: FrameType | None, depth: int = 6) -> str:
    """The innermost ``depth`` frames of a stack, innermost first: ``file:line in func``."""
    stack = traceback.extract_stack(frame)[-depth:]
    return " <- ".join(f"{_short_path(f.filename)}:{f.lineno} in {f.name}" for f in reversed(stack))


class _Watchdog:
    """Ends the process when a step outlives its bound by :data:`GRACE_SECONDS` (a step
    blocked in C code that no signal interrupts), printing what was measured so far."""

    def __init__(self) -> None:
        self.bounds: list[tuple[str, float]] = []
        """The bounds in force, outermost first: (step, deadline)."""
        self.partial: tuple[str, dict[str, Any], dict[str, Any]] | None = None
        self.main = threading.main_thread().ident
        self.started = False

    def arm(self, step: str, seconds: float) -> None:
        if not self.started:
            threading.Thread(target=self._watch, daemon=True, name="probe-watchdog").start()
            self.started = True
        self.bounds.append((step, time.monotonic() + seconds))

    def disarm(self) -> None:
        self.bounds.pop()

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            bounds = list(self.bounds)
            if not bounds or time.monotonic() < min(deadline for _, deadline in bounds):
                continue
            where = frames_text(sys._current_frames().get(self.main or 0))
            step = bounds[-1][0]
            text = f"hangs: {step} did not return (no signal reached it); blocked in {where}"
            if self.partial is None:
                print(f"FAILED {text}", flush=True)
                os._exit(3)
            tag, out, info = self.partial
            info.update({"hangs": text, "error": text})
            print(f"{tag} {json.dumps(out)}", flush=True)
            os._exit(0)


WATCHDOG = _Watchdog()


@contextlib.contextmanager
def replaced(owner: Any, values: dict[str, Any]) -> Iterator[None]:
    """``owner``'s attributes set to ``values`` for the body, then put back."""
    saved = {name: getattr(owner, name) for name in values}
    try:
        for name, value in values.items():
            setattr(owner, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


@contextlib.contextmanager
def bounded(step: str, seconds: float | None = None) -> Iterator[None]:
    """Run the body under a bound (:data:`STEP_SECONDS` unless given); past it, raise
    :class:`Hang` in the frame it blocked in. Bounds nest: an enclosing bound that ends
    first still ends the body, and is in force again afterwards."""
    seconds = STEP_SECONDS if seconds is None else seconds
    outer = signal.getitimer(signal.ITIMER_REAL)[0]
    bound = min(seconds, outer) if outer else seconds

    def expire(signum: int, frame: FrameType | None) -> None:
        msg = f"{step} did not return in {bound:.0f} s; blocked in {frames_text(frame)}"
        raise Hang(msg)

    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, bound)
    WATCHDOG.arm(step, bound + GRACE_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        WATCHDOG.disarm()
        if outer:
            left = outer - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))


def clip(text: str, limit: int = 600) -> str:
    """``text`` cut at a word to ``limit`` characters, marked with an ellipsis when cut; long
    enough for the series' whole refusal with its fix."""
    if len(text) <= limit:
        return text
    word = text.rfind(" ", 0, limit)
    return text[: word if word > 0 else limit] + " \N{HORIZONTAL ELLIPSIS}"


def error_text(exc: BaseException) -> str:
    """``Type: message``, one line, without file paths."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return clip(re.sub(r" \(/[^)]*\)", "", text))


def cpu_stop(exc: BaseException) -> str:
    """Why ``exc`` is where a CPU stops the call ('' when it is a real failure): it reached
    the accelerator, or it needs the KV caches that only ``register_kv_caches`` gives."""
    device = needs_device(exc)
    if device:
        return f"stopped at {device} ({type(exc).__name__}): needs CUDA"
    if "register_kv_caches" in str(exc):
        return clip(f"stopped: no KV cache is registered ({error_text(exc)})")
    return ""


def needs_device(exc: BaseException) -> str:
    """Where ``exc`` shows that the call reached the accelerator ('' if it did not): the
    frame of torch's CUDA module it was raised in (decided by frames, never by words)."""
    tb: TracebackType | None = exc.__traceback__
    last = ""
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if "/torch/cuda/" in name or "/torch/_C" in name:
            last = f"{_short_path(name)}:{tb.tb_lineno}"
        tb = tb.tb_next
    return last


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


def transfer_config(server: str) -> Any:
    """vLLM's KVTransferConfig naming ``LMCacheMPConnector`` and the lmcache server at
    ``server`` (``tcp://HOST:PORT``)."""
    from vllm.config import KVTransferConfig

    host, port = server.rsplit(":", 1)
    return KVTransferConfig(
        kv_connector="LMCacheMPConnector",
        kv_role="kv_both",
        kv_connector_extra_config={
            "lmcache.mp.host": host,
            "lmcache.mp.port": int(port),
            "lmcache.mp.mq_timeout": 10.0,
        },
    )


def _hash_fn(name: str) -> Callable[..., Any]:
    try:
        from vllm.utils.hashing import get_hash_fn_by_name
    except ImportError:  # vLLM before the utils split
        from vllm.utils import get_hash_fn_by_name  # type: ignore[no-redef]
    return get_hash_fn_by_name(name)


def block_hasher(config: Any) -> Any:
    """vLLM's own block hasher, as its engine core gives every request with a KV connector."""
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    fn = _hash_fn(config.cache_config.prefix_caching_hash_algo)
    init_none_hash(fn)
    return get_request_block_hasher(config.cache_config.block_size, fn)


def hashed_request(request_id: str, prompt: list[int], hasher: Any, fill: Callable) -> Any:
    """A real vLLM Request of ``prompt`` carrying real block hashes."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    req = fill(
        Request,
        {
            "request_id": request_id,
            "prompt_token_ids": prompt,
            "sampling_params": SamplingParams(max_tokens=1),
            "pooling_params": None,
            "eos_token_id": None,
            "arrival_time": time.time(),
            "client_index": 0,
            "priority": 0,
            "block_hasher": hasher,
        },
    )
    if not req.block_hashes:
        msg = "vLLM's block hasher gave the request no block hashes"
        raise RuntimeError(msg)
    return req


def forward_context(fill: Callable) -> Any:
    """An empty ForwardContext (no attention layers ran: there is no model on a CPU here)."""
    from vllm.forward_context import ForwardContext

    return fill(
        ForwardContext,
        {"no_compile_layers": {}, "attn_metadata": {}, "slot_mapping": {}, "virtual_engine": 0},
    )


def drive_worker(worker: Any, metadata: Any, fill: Callable) -> dict[str, str]:
    """The worker's calls of one engine step; each ``ran``, ``not run here: ...`` (stopped
    at the accelerator) or ``failed: ...``. The first failure or hang ends the step."""
    done: dict[str, str] = {}
    calls: dict[str, Callable[[], Any]] = {
        "bind_connector_metadata": lambda: worker.bind_connector_metadata(metadata),
        "start_load_kv": lambda: worker.start_load_kv(forward_context(fill)),
        "wait_for_save": worker.wait_for_save,
        "get_finished": lambda: worker.get_finished(set()),
        "clear_connector_metadata": worker.clear_connector_metadata,
    }
    for name in WORKER_CALLS:
        if not callable(getattr(worker, name, None)):
            done[name] = "not in this connector's API"
            continue
        try:
            with bounded(f"worker {name}"):
                calls[name]()
        except Exception as exc:
            stop = cpu_stop(exc)
            if not stop:
                done[name] = clip(f"failed: {error_text(exc)}")
                break
            done[name] = f"not run here: {stop}"
        else:
            done[name] = "ran"
    return done


def expected_geometry(mla: bool) -> dict[str, Any]:
    """What rank 1 of TP 2 (one PP stage, one server) must hand to lmcache."""
    if mla:  # the KV cache is the same on every TP rank: one piece, written by TP rank 0
        return {"kv_world_size": 1, "kv_worker_id": 0, "is_kv_writer": False}
    return {"kv_world_size": TP_SIZE, "kv_worker_id": RANK, "is_kv_writer": True}


def sent_geometry(strategy: Any) -> dict[str, Any]:
    """What a ParallelStrategy says, read through the release's own fields and properties."""
    found = {}
    for name in ("kv_world_size", "kv_worker_id", "is_kv_writer"):
        if hasattr(strategy, name):
            found[name] = getattr(strategy, name)
    return found


class _Sent(BaseException):
    """Raised by the stand-in once lmcache's adapter has normalised what it was handed."""

    def __init__(self, strategy: Any) -> None:
        super().__init__()
        self.strategy = strategy


def _capture_strategy(adapters: Any) -> None:
    """Stand in for the adapter's connection: after lmcache's own argument normalisation
    (``_normalize_adapter_init_args``, in every release from 0.4.6 on), stop with what it gave."""
    real = adapters._normalize_adapter_init_args

    def capture(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        raise _Sent(next(r for r in result if hasattr(r, "kv_world_size")))

    adapters._normalize_adapter_init_args = capture


def _as_rank(config: Any, mla: bool) -> None:
    """Make ``config`` what rank ``RANK`` of TP ``TP_SIZE`` sees (the stand-in for a second
    process); with ``mla``, the model config answers ``use_mla`` True (no MLA model here)."""
    parallel = config.parallel_config
    parallel.tensor_parallel_size = TP_SIZE
    parallel.world_size = TP_SIZE * parallel.pipeline_parallel_size
    parallel.rank = RANK
    if mla:
        type(config.model_config).use_mla = property(lambda self: True)


def _geometry_child(build_worker: Callable[[Any], Any], config: Any, mla: bool) -> dict[str, Any]:
    try:
        from lmcache.integration.vllm import vllm_multi_process_adapter as adapters
    except ImportError as exc:
        return {"error": f"lmcache's adapter module does not import: {exc}"}
    if not hasattr(adapters, "_normalize_adapter_init_args"):
        return {"error": "this lmcache has no _normalize_adapter_init_args: not measurable"}
    _capture_strategy(adapters)
    _as_rank(config, mla)
    try:
        build_worker(config)
    except _Sent as sent:
        return {"sent": sent_geometry(sent.strategy), "fields": _fields(sent.strategy)}
    except Exception as exc:
        return {"error": clip(f"the worker is not built: {error_text(exc)}")}
    return {"error": "the worker was built without handing lmcache a parallel description"}


def _fields(strategy: Any) -> dict[str, Any]:
    import dataclasses

    if dataclasses.is_dataclass(strategy):
        return {f.name: getattr(strategy, f.name) for f in dataclasses.fields(strategy)}
    return {}


def geometry(build_worker: Callable[[Any], Any], config: Any) -> dict[str, Any]:
    """Build the worker of rank 1 in TP 2, MLA off and on, each in a forked child (so the
    stand-ins stay out of every other step), up to where it hands lmcache its description.

    :returns: per MLA setting, ``sent`` (what lmcache was handed), ``expected``, ``ok``; or
        ``error`` where nothing was handed; and ``ok`` over both.
    """
    result: dict[str, Any] = {}
    for mla in (False, True):
        key = "mla on" if mla else "mla off"
        got = _in_child(lambda mla=mla: _geometry_child(build_worker, config, mla))
        want = expected_geometry(mla)
        if "sent" in got:
            sent = got["sent"]
            got["expected"] = {k: v for k, v in want.items() if k in sent}
            got["ok"] = all(sent[k] == v for k, v in got["expected"].items())
        result[key] = got
    built = [r for r in result.values() if "sent" in r]
    result["ok"] = all(r["ok"] for r in built) if len(built) == len(result) else None
    return result


def _in_child(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``body()`` in a forked child under the step bound; its JSON answer."""
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            with bounded("geometry"):
                answer = body()
        except Hang as hang:
            answer = {"error": f"hangs: {hang}"}
        except BaseException as exc:
            answer = {"error": error_text(exc)}
        with os.fdopen(write, "w") as pipe:
            pipe.write(json.dumps(answer, default=str))
        os._exit(0)
    os.close(write)
    deadline = time.monotonic() + STEP_SECONDS + GRACE_SECONDS
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read)
            return {"error": "hangs: the geometry build did not return and was killed"}
        time.sleep(0.05)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    return json.loads(text) if text else {"error": "the geometry build died"}


def verdict(info: dict[str, Any]) -> str:
    """What an engine meets first with one built candidate: ``fails`` at start-up (a role
    does not construct), ``hangs`` on a request, ``fails`` in a step, ``wrong geometry``
    (silent: a tensor-parallel worker reads and writes the wrong KV pieces); then what vLLM's
    scheduler loop found (``engine_loop.VERDICTS``: ``serves``, ``fails`` where it raised,
    ``hangs``, ``wrong blocks``, ``leaks``, ``unverified``); ``works`` where only the one
    engine step could be measured (no scheduler loop: the release's test helpers were not
    given)."""
    constructs = ("constructs_scheduler", "constructs_worker")
    if "hangs" not in info and any(info.get(step) is False for step in constructs):
        return "fails"
    if "hangs" in info:
        return "hangs"
    if any(info.get(step) is False for step in STEPS if step != "geometry"):
        return "fails"
    if info.get("geometry") is False:
        return "wrong geometry"
    if not all(info.get(step) is True for step in STEPS):
        return "fails"
    loop = info.get("engine_loop")
    if loop is None:
        return "works"
    if loop["verdict"] == "raises":
        info.setdefault("error", f"engine loop: raises at {loop['detail']}")
        return "fails"
    if loop["verdict"] == "hangs":
        info.setdefault("hangs", f"engine loop: {loop['detail']}")
    elif loop["verdict"] != "serves":
        info.setdefault("error", f"engine loop: {loop['verdict']}: {loop['detail']}")
    return str(loop["verdict"])


def takes_kv_cache_config(cls: type) -> bool:
    """Whether ``cls`` is constructed with a KVCacheConfig (vLLM 0.23.0 and later)."""
    return "kv_cache_config" in inspect.signature(cls.__init__).parameters
