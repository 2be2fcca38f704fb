"""doctor's static diagnosis, inside the interpreter that holds vLLM: no server, no device.

Run by path: ``PY doctor_static.py SPEC.json``. ``SPEC.json`` holds ``layers`` (directories
put first on ``sys.path``, one diagnosis each; ``[null]`` for the interpreter's own lmcache)
and ``overlay`` (the series' connector file for this vLLM release, or null). vLLM is imported
once; a child is forked per layer and prints one ``DOCTOR {json}`` line; the parent prints
``LAYER i exit code N``.

The construction check is the series' own (patch 0006): taken from vLLM's module when it is
patched, else from the overlay file, imported as a module of its own.

Its reader is ``diagnosis/doctor.py``, typed there as ``StaticDiagnosis``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

# Run by path, this file's directory is first on sys.path: its sibling imports as a module.
from connector_build import (
    VLLM_MODULE,
    error_text,
    lmcache_modules,
    per_layer,
    unmet,
    version,
)

Check = Callable[[ModuleType], list[str]]


def series_check(vllm_module: ModuleType | None, overlay: str | None) -> Check | None:
    """The series' ``_lmcache_api_mismatches``; None when neither place can give it."""
    found = getattr(vllm_module, "_lmcache_api_mismatches", None)
    if found is not None or overlay is None:
        return found
    spec = importlib.util.spec_from_file_location("vllm_lmcache_mp_series", overlay)
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
    return module._lmcache_api_mismatches


def row(module_name: str, class_name: str, check: Check | None) -> dict[str, Any]:
    """Import, subclass and (statically) build one candidate."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    info: dict[str, Any] = {
        "module": module_name,
        "imports": False,
        "subclass": False,
        "builds": False,
        "error": "",
    }
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        info["error"] = error_text(exc)
        return info
    info["imports"] = True
    cls = getattr(module, class_name, None)
    info["subclass"] = isinstance(cls, type) and issubclass(cls, KVConnectorBase_V1)
    if not info["subclass"]:
        info["error"] = f"{class_name} is {cls!r}, not a KVConnectorBase_V1 subclass"
        return info
    mismatches = check(sys.modules[cls.__module__]) if check else []
    info["builds"] = not mismatches
    info["error"] = mismatches[0] if mismatches else ""
    return info


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


def diagnose(overlay: str | None) -> dict[str, Any]:
    """Everything doctor says about the vLLM and lmcache importable here."""
    out: dict[str, Any] = {"vllm": version("vllm"), "lmcache": version("lmcache")}
    out["vllm_unmet"] = unmet("vllm") if out["vllm"] else []
    try:
        vllm_module = importlib.import_module(VLLM_MODULE)
    except Exception as exc:
        out["import_error"] = error_text(exc)
        vllm_module = None
    check = series_check(vllm_module, overlay)
    out["checked"] = check is not None
    out["candidates"] = [row(m, "LMCacheMPConnector", check) for m in lmcache_modules()]
    if vllm_module is None:
        return out
    patched = hasattr(vllm_module, "LMCacheMPConnectorUpstream")
    out["patched"] = patched
    builtin = "LMCacheMPConnectorUpstream" if patched else "LMCacheMPConnector"
    out["builtin"] = row(VLLM_MODULE, builtin, check)
    cls = vllm_module.LMCacheMPConnector
    out["chosen"] = f"{cls.__module__}.{cls.__qualname__}"
    resolution = dict(getattr(vllm_module, "LMCACHE_MP_CONNECTOR_RESOLUTION", {}))
    out["resolution"] = resolution
    if "error" in resolution:
        out["chosen_builds"], out["chosen_error"] = False, resolution["error"]
    else:
        mismatches = check(sys.modules[cls.__module__]) if check else []
        out["chosen_builds"] = not mismatches
        out["chosen_error"] = mismatches[0] if mismatches else ""
    out["module_path_route"] = module_path_routes(out["candidates"])
    return out


def main(spec_path: str) -> None:
    """Import what every diagnosis shares once, then diagnose each layer in a forked child."""
    spec = json.loads(Path(spec_path).read_text())
    per_layer("DOCTOR", spec["layers"], lambda _: diagnose(spec["overlay"]))


if __name__ == "__main__":
    main(sys.argv[1])
