"""Preflight: which LMCacheMPConnector will this environment run, and will it start?"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import Version

from vllm_patches._proc import run_subprocess, stopped_on_signals
from vllm_patches.errors import PatchToolError
from vllm_patches.live import Layer, build_layers, failed_step, works
from vllm_patches.lmcache_server import ServerPool
from vllm_patches.matrix import shipped, starts_with
from vllm_patches.series import CONNECTOR, OVERLAY_DIR
from vllm_patches.targets import installed_vllm

CHECKER_PARTS = {
    "_lmcache_api_mismatches",
    "_is_str_expr",
    "_str_names",
    "_rejects_str",
    "_CONTAINER_ANNOTATION",
}
_SCRIPT = r"""
import ast, importlib, importlib.metadata as md, inspect, json, os, pkgutil, re, sys
from types import ModuleType
from typing import Any

exec(os.environ["VLLM_PATCHES_CHECKER"])
VLLM_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector"
PACKAGE = "lmcache.integration.vllm"


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def row(module_name, class_name="LMCacheMPConnector"):
    info = {"module": module_name, "imports": False, "subclass": False, "builds": False,
            "error": ""}
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        info["error"] = f"{type(e).__name__}: {e}"
        return info
    info["imports"] = True
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
    cls = getattr(module, class_name, None)
    info["subclass"] = isinstance(cls, type) and issubclass(cls, KVConnectorBase_V1)
    if not info["subclass"]:
        info["error"] = f"{class_name} is {cls!r}, not a KVConnectorBase_V1 subclass"
        return info
    mismatches = _lmcache_api_mismatches(sys.modules[cls.__module__])
    info["builds"] = not mismatches
    info["error"] = mismatches[0] if mismatches else ""
    return info


def unmet(project):
    # project's requirements that the installed packages do not meet, as pip check says them
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


out = {"vllm": version("vllm"), "lmcache": version("lmcache"), "candidates": []}
out["vllm_unmet"] = unmet("vllm") if out["vllm"] else []
try:
    spec = importlib.util.find_spec(PACKAGE)
    names = [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations or [])]
except Exception:
    names = []
frozen = sorted((n for n in names if re.fullmatch(r"lmcache_mp_connector_\d{4}", n)), reverse=True)
for name in ["lmcache_mp_connector", *frozen]:
    if name in names:
        out["candidates"].append(row(f"{PACKAGE}.{name}"))
try:
    vllm_module = importlib.import_module(VLLM_MODULE)
except Exception as e:
    out["import_error"] = f"{type(e).__name__}: {e}"
else:
    patched = hasattr(vllm_module, "LMCacheMPConnectorUpstream")
    out["patched"] = patched
    builtin_name = "LMCacheMPConnectorUpstream" if patched else "LMCacheMPConnector"
    out["builtin"] = row(VLLM_MODULE, builtin_name)
    cls = vllm_module.LMCacheMPConnector
    out["chosen"] = f"{cls.__module__}.{cls.__qualname__}"
    resolution = dict(getattr(vllm_module, "LMCACHE_MP_CONNECTOR_RESOLUTION", {}))
    out["resolution"] = resolution
    if "error" in resolution:
        out["chosen_builds"], out["chosen_error"] = False, resolution["error"]
    else:
        mismatches = _lmcache_api_mismatches(sys.modules[cls.__module__])
        out["chosen_builds"] = not mismatches
        out["chosen_error"] = mismatches[0] if mismatches else ""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    routes = {}
    for candidate in out["candidates"]:
        if not candidate["imports"]:
            continue
        try:
            got = KVConnectorFactory.get_connector_class(KVTransferConfig(
                kv_connector="LMCacheMPConnector", kv_role="kv_both",
                kv_connector_module_path=candidate["module"]))
            routes[candidate["module"]] = f"{got.__module__}.{got.__qualname__}"
        except Exception as e:
            routes[candidate["module"]] = f"error: {type(e).__name__}: {e}"
    out["module_path_route"] = routes
print("DOCTOR " + json.dumps(out))
"""

# Imports what every diagnosis shares once, then forks a child per lmcache layer that runs
# _SCRIPT with the layer first on sys.path; lmcache itself is imported in the children only.
_FORKING = r"""
import importlib, json, os, sys, traceback
for shared in ("vllm.config", "vllm.distributed.kv_transfer.kv_connector.factory",
               "vllm.distributed.kv_transfer.kv_connector.v1.base", "vllm.v1.request",
               "vllm.v1.core.sched.output", "vllm.v1.kv_cache_interface"):
    importlib.import_module(shared)
assert not any(m.split(".")[0] == "lmcache" for m in sys.modules), "lmcache imported early"
for index, layer in enumerate(json.loads(os.environ["VLLM_PATCHES_LAYERS"])):
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        sys.path.insert(0, layer)
        importlib.invalidate_caches()
        try:
            exec(os.environ["VLLM_PATCHES_DOCTOR"], {"__name__": "__main__"})
        except BaseException as e:
            traceback.print_exc()
            print(f"FAILED {type(e).__name__}: {e}".replace("\n", " "))
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(f"LAYER {index} exit code {os.waitstatus_to_exitcode(status)}", flush=True)
"""


def checker_source() -> str:
    """The construction check, taken from the series' own code (patch 0006) in the overlay:
    the checker and the module-level helpers it calls."""
    overlay = next(iter(sorted(OVERLAY_DIR.glob(f"*/{CONNECTOR}"))))
    text = overlay.read_text()
    nodes = [n for n in ast.parse(text).body if _defines(n) & CHECKER_PARTS]
    return "\n\n".join(ast.get_source_segment(text, n) or "" for n in nodes)


def _defines(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    return set()


def _lmcache_advice(vllm_version: str) -> str:
    """Which lmcache releases the shipped pairing table (``matrix/matrix.json``) says work."""
    release = Version(vllm_version).public
    working = starts_with(shipped(), release, "patched")
    if working == "none":
        return (
            f"install an lmcache release whose connector fits vLLM {release} "
            "(README: Which connector will I get?)"
        )
    return f"with the series applied, install lmcache {working}"


def _brief(error: str) -> str:
    return re.sub(r" \(/[^)]*\)", "", error)


@dataclass
class Diagnosis:
    """What doctor found, and its verdict."""

    data: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return "import_error" not in self.data and bool(self.data.get("chosen_builds"))

    def fixes(self) -> list[str]:
        """What to do when the verdict fails."""
        data = self.data
        if "import_error" in data:
            return [
                f"vLLM {data['vllm']}'s connector module does not import with lmcache "
                f"{data['lmcache']}; install an lmcache release of this vLLM's time"
            ]
        working = [c["module"] for c in data["candidates"] if c["builds"]]
        fixes = []
        if data.get("patched"):
            fixes += [f"set LMCACHE_MP_CONNECTOR_MODULE={m}" for m in working]
        elif working:
            fixes.append(
                "apply the series (tools/apply-patches --python PY): it picks one of these"
            )
            routes = data.get("module_path_route", {})
            fixes += [
                f"or set kv_connector_module_path={m} in --kv-transfer-config"
                for m in working
                if routes.get(m) == f"{m}.LMCacheMPConnector"
            ]
        if not working:
            fixes.append(_lmcache_advice(data["vllm"]))
        return fixes

    def lines(self) -> list[str]:
        data = self.data
        out = [f"vLLM {data['vllm']}, lmcache {data['lmcache'] or 'not installed'}"]
        if "import_error" in data:
            out.append(f"vLLM's connector module does not import: {data['import_error']}")
        else:
            state = "patched (this series)" if data["patched"] else "unpatched"
            out.append(f"vLLM's lmcache_mp_connector: {state}")
        out += [f"warning: {unmet}" for unmet in data.get("vllm_unmet", [])]
        for candidate in [*data["candidates"], *([data["builtin"]] if "builtin" in data else [])]:
            keys = ("imports", "subclass", "builds")
            shown = keys[: next((i + 1 for i, k in enumerate(keys) if not candidate[k]), 3)]
            flags = ", ".join(f"{k} {'yes' if candidate[k] else 'no'}" for k in shown)
            error = f" ({_brief(candidate['error'])})" if candidate["error"] else ""
            out.append(f"  {candidate['module']}: {flags}{error}")
        if "chosen" in data:
            out.append(f"LMCacheMPConnector resolves to {data['chosen']}")
            for module, got in data.get("module_path_route", {}).items():
                out.append(f"  kv_connector_module_path={module} -> {got}")
        if self.ok:
            out.append("verdict: OK")
        else:
            error = data.get("chosen_error") or data.get("import_error", "")
            out.append(f"verdict: will fail when the engine starts: {_brief(error)}")
            out += [f"fix: {fix}" for fix in self.fixes()]
        return out


def _env() -> dict[str, str]:
    return {"VLLM_PATCHES_CHECKER": checker_source(), "LMCACHE_LOG_LEVEL": "ERROR"}


def diagnose(
    python: str | Path, pythonpath: list[Path] | None = None, env: Mapping[str, str] | None = None
) -> Diagnosis:
    """Inspect the vLLM and lmcache installed in ``python``; nothing is built or contacted."""
    full_env = {**_env(), **(env or {})}
    if pythonpath:
        full_env["PYTHONPATH"] = ":".join(str(p) for p in pythonpath)
    proc = run_subprocess([python, "-c", _SCRIPT], env=full_env, what="doctor's probe")
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("DOCTOR ")), "")
    if not line:
        msg = f"{python} did not answer as a Python interpreter; give the python of vLLM's venv"
        raise PatchToolError(msg)
    data = json.loads(line[len("DOCTOR ") :])
    _require_vllm(python, data)
    return Diagnosis(data)


def _require_vllm(python: str | Path, data: dict) -> None:
    if data.get("vllm") is None:
        msg = f"no vLLM is installed in {python}; give --python the interpreter of vLLM's venv"
        raise PatchToolError(msg)


def diagnose_layers(python: str | Path, layers: list[Path]) -> list[Diagnosis]:
    """``diagnose(python, [layer])`` for each layer, importing vLLM once for all of them.

    One process imports what every diagnosis shares (``vllm.config``: ~10 s of the ~11 s
    a diagnosis takes) and forks a child per layer, which imports lmcache from it alone.
    """
    env = {**_env(), "VLLM_PATCHES_DOCTOR": _SCRIPT}
    env["VLLM_PATCHES_LAYERS"] = json.dumps([str(layer) for layer in layers])
    proc = run_subprocess([python, "-c", _FORKING], env=env, what="doctor's probes")
    found: list[Diagnosis] = []
    pending: dict | None = None
    failure = ""
    for line in proc.stdout.splitlines():
        if line.startswith("DOCTOR "):
            pending = json.loads(line[len("DOCTOR ") :])
        elif line.startswith("FAILED "):
            failure = line[len("FAILED ") :]
        elif line.startswith("LAYER "):
            status = failure or line.split(" ", 2)[2]
            failed = {"candidates": [], "import_error": f"the probe failed: {status}"}
            found.append(Diagnosis(pending if pending is not None else failed))
            pending, failure = None, ""
    return found


@dataclass
class LiveDiagnosis:
    """What building the connector for real against a server found, and its verdict."""

    data: dict = field(default_factory=dict)

    @property
    def chosen(self) -> dict:
        return self.data.get("chosen_build", {})

    @property
    def ok(self) -> bool:
        return "import_error" not in self.data and bool(works(self.chosen))

    def fixes(self) -> list[str]:
        """What to do when the engine would fail."""
        data = self.data
        working = [c["module"] for c in data.get("candidates", []) if works(c)]
        if data.get("patched"):
            fixes = [
                f"set LMCACHE_MP_CONNECTOR_MODULE={m}" for m in working if m.startswith("lmcache")
            ]
        elif working:
            fixes = [
                "apply the series (tools/apply-patches --python PY): it picks "
                + " or ".join(working)
                + ", which works here"
            ]
        else:
            fixes = []
        if not working and data.get("vllm"):
            fixes.append(_lmcache_advice(data["vllm"]))
        return fixes

    def lines(self) -> list[str]:
        data = self.data
        out = [
            f"vLLM {data.get('vllm')}, lmcache {data.get('lmcache') or 'not installed'}; "
            f"built for real against the LMCache server at {data.get('server')}"
        ]
        if "import_error" in data:
            out.append(f"vLLM's connector module does not import: {data['import_error']}")
        out += [f"warning: {unmet}" for unmet in data.get("vllm_unmet", [])]
        for candidate in data.get("candidates", []):
            step = failed_step(candidate)
            what = f"fails at: {step} ({_brief(candidate.get('error', ''))})" if step else "works"
            out.append(f"  {candidate['module']}: {what}")
        if "chosen" in data:
            out.append(f"LMCacheMPConnector resolves to {data['chosen']}")
        if self.ok:
            out.append(f"round trip: {self.chosen.get('round_trip', '')}")
            out.append(f"not checked on a CPU: {data.get('worker_limit', '')}")
            out.append("verdict: OK")
        else:
            error = data.get("import_error") or self.chosen.get("error", "")
            out.append(f"verdict: will fail when the engine starts: {_brief(error)}")
            out += [f"fix: {fix}" for fix in self.fixes()]
        return out


def live_check(python: str | Path, server: str | None = None) -> LiveDiagnosis:
    """Build the candidates in ``python`` for real against ``server``.

    :param server: the deployment's LMCache server (``tcp://HOST:PORT``); None starts one of
        the installed lmcache on loopback for the check and stops it afterwards.
    """
    installed_vllm(str(python))  # a clear error where there is no vLLM
    with stopped_on_signals(), ServerPool() as pool:
        if server is None:
            running = pool.get(Path(python), None, f"installed in {python}")
            if isinstance(running, str):
                msg = f"{running}; give --server URL to check against a running server"
                raise PatchToolError(msg)
            server = running.url
        (data,) = build_layers(python, [Layer(None, server)])
    _require_vllm(python, data)
    return LiveDiagnosis(data)
