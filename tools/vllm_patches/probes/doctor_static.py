"""doctor's static diagnosis, inside the interpreter that holds vLLM: no server, no device.

Run by path: ``PY doctor_static.py SPEC.json``. ``SPEC.json`` holds ``layers`` (directories
put first on ``sys.path``, one diagnosis each; ``[null]`` for the interpreter's own lmcache)
and ``overlay`` (the series' connector file for this vLLM release, or null). vLLM is imported
once; a child is forked per layer and prints one ``DOCTOR {json}`` line; the parent prints
``LAYER i exit code N``.

The series' own code is asked (patch 0004's ``_choose_lmcache_mp_connector()``, patch 0002's
name checks): from vLLM's module when it is patched, else from the overlay file, imported as
a module of its own (what the series would do here). lmcache's connectors are checked only
for importing and subclassing; nothing static can tell more of them.

Its reader is ``diagnosis/doctor.py``, typed there as ``StaticDiagnosis``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

# Run by path, this file's directory is first on sys.path: its sibling imports as a module.
from connector_build import (
    NO_SERVER,
    VLLM_MODULE,
    builtin_name,
    error_text,
    lmcache_modules,
    per_layer,
    resolution,
    unmet,
    version,
)
from connector_build import (
    candidate as connector_class,
)
from serving import replaced

SERIES_MODULE = "vllm_lmcache_mp_series"
"""The name the overlay file is imported under when vLLM's own module is not patched."""
STAND_IN_CONFIG = SimpleNamespace(
    model_config=SimpleNamespace(model="doctor", use_mla=False),  # lmcache's mla_enabled reads
    cache_config=SimpleNamespace(block_size=16),
    parallel_config=SimpleNamespace(
        world_size=1, rank=0, tensor_parallel_size=1, pipeline_parallel_size=1
    ),
    kv_transfer_config=SimpleNamespace(kv_connector_extra_config={}),
)
ADAPTERS = ("LMCacheMPSchedulerAdapter", "LMCacheMPWorkerAdapter")
"""What the series' name checks read of a VllmConfig: one rank, no MLA."""


def series_module(vllm_module: ModuleType | None, overlay: str | None) -> ModuleType | None:
    """The series' connector module: vLLM's when patched, else the overlay file imported as
    ``SERIES_MODULE``; None when neither can be had."""
    if hasattr(vllm_module, "_choose_lmcache_mp_connector"):
        return vllm_module
    if overlay is None:
        return None
    spec = importlib.util.spec_from_file_location(SERIES_MODULE, overlay)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("LMCACHE_USE_UPSTREAM_MP")
    os.environ["LMCACHE_USE_UPSTREAM_MP"] = "1"  # its import-time resolution: the builtin
    try:
        spec.loader.exec_module(module)
    except Exception:
        return None
    finally:
        if previous is None:
            del os.environ["LMCACHE_USE_UPSTREAM_MP"]
        else:
            os.environ["LMCACHE_USE_UPSTREAM_MP"] = previous
    return module


def stand_in(adapter: type) -> type:
    """``adapter`` with its name, signature and methods, whose construction does nothing. The
    series' placeholder where lmcache has no adapter (``None``; ``Any`` on the 0.12-0.18 bases
    of series before 2026-12-03) is kept: the builtin refuses it."""
    if adapter is Any or adapter is None:
        return adapter
    namespace = {"__signature__": inspect.signature(adapter), "__init__": lambda _, **__: None}
    return type(adapter.__name__, (adapter,), namespace)


def adapter_error(series: ModuleType) -> str:
    """What the series' builtin raises at construction with the installed lmcache before it
    connects ('' if nothing): its own checks of ParallelStrategy, LoadStoreOp and both
    adapters, through the module's public ``create_scheduler_adapter`` and
    ``create_worker_adapter`` with stand-ins for the adapters themselves (the same calls in
    every version of the series)."""
    stand_ins = {name: stand_in(getattr(series, name)) for name in ADAPTERS}
    try:
        with replaced(series, stand_ins):
            series.create_scheduler_adapter(NO_SERVER, None, STAND_IN_CONFIG, 1.0, 1.0)
            series.create_worker_adapter(NO_SERVER, None, STAND_IN_CONFIG, 1.0, 1.0)
    except Exception as exc:
        return error_text(exc)
    return ""


def row(module_name: str, class_name: str) -> dict[str, Any]:
    """Import one candidate and check that it is a connector class (the build probe's check);
    nothing static builds it."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    info, _ = connector_class(module_name, class_name, KVConnectorBase_V1)
    return {"builds": None, "error": "", **info}


def module_path_routes(candidates: list[dict[str, Any]]) -> dict[str, str]:
    """What ``kv_connector_module_path=M`` gives, for each importable candidate M."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    routes = {}
    for candidate in candidates:
        if not candidate["imports"]:
            continue
        config = KVTransferConfig(
            kv_connector="LMCacheMPConnector",
            kv_role="kv_both",
            kv_connector_module_path=candidate["module"],
        )
        try:
            got = KVConnectorFactory.get_connector_class(config)
            routes[candidate["module"]] = f"{got.__module__}.{got.__qualname__}"
        except Exception as exc:
            routes[candidate["module"]] = f"error: {error_text(exc)}"
    return routes


def series_choice(series: ModuleType, error: str) -> dict[str, str]:
    """What the series picks here, why, and the builtin's ``error`` where it picks that."""
    chosen = resolution(series)
    builtin = f"{series.__name__}.LMCacheMPConnectorUpstream"
    is_builtin = chosen["class"] == builtin
    chosen["class"] = chosen["class"].replace(f"{SERIES_MODULE}.", f"{VLLM_MODULE}.")
    chosen["error"] = error if is_builtin else ""
    return chosen


def diagnose(overlay: str | None) -> dict[str, Any]:
    """Everything doctor says about the vLLM and lmcache importable here."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    out: dict[str, Any] = {"vllm": version("vllm"), "lmcache": version("lmcache")}
    out["vllm_unmet"] = unmet("vllm") if out["vllm"] else []
    try:
        vllm_module = importlib.import_module(VLLM_MODULE)
    except Exception as exc:
        out["import_error"] = error_text(exc)
        vllm_module = None
    series = series_module(vllm_module, overlay)
    out["checked"] = series is not None
    out["candidates"] = [row(m, "LMCacheMPConnector") for m in lmcache_modules()]
    if vllm_module is None:
        return out
    patched = vllm_module is series
    out["patched"] = patched
    error = adapter_error(series) if series is not None else ""
    if series is not None:
        out["resolution"] = series_choice(series, error)
    builtin = builtin_name(vllm_module)
    out["builtin"] = row(VLLM_MODULE, builtin)
    if patched and out["builtin"]["subclass"]:
        out["builtin"]["builds"], out["builtin"]["error"] = not error, error
    cls = vllm_module.LMCacheMPConnector
    out["chosen"] = f"{cls.__module__}.{cls.__qualname__}"
    if cls is getattr(vllm_module, builtin):
        # The series' builtin: its name checks; vLLM's own, unpatched: nothing static tells.
        out["chosen_builds"] = not error if patched else None
        out["chosen_error"] = error if patched else ""
    else:  # lmcache's class: what the resolution checks of it
        out["chosen_builds"] = isinstance(cls, type) and issubclass(cls, KVConnectorBase_V1)
        out["chosen_error"] = "" if out["chosen_builds"] else "not a KVConnectorBase_V1 subclass"
    out["module_path_route"] = module_path_routes(out["candidates"])
    return out


def main(spec_path: str) -> None:
    """Import what every diagnosis shares once, then diagnose each layer in a forked child."""
    spec = json.loads(Path(spec_path).read_text())
    per_layer("DOCTOR", spec["layers"], lambda _: diagnose(spec["overlay"]))


if __name__ == "__main__":
    main(sys.argv[1])
