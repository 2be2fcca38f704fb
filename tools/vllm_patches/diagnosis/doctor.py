"""Preflight: which LMCacheMPConnector will this environment run, and will it start?"""

from __future__ import annotations

import functools
import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, cast

from packaging.version import Version

from vllm_patches._proc import run_subprocess, stopped_on_signals
from vllm_patches.diagnosis.live import (
    CandidateBuild,
    Layer,
    LayerBuild,
    build_layers,
    built_text,
    loop_text,
    per_layer_results,
    scheduler_helpers,
    worker_reached,
    works,
)
from vllm_patches.diagnosis.matrix import cpu_round_trips, shipped, starts_with
from vllm_patches.diagnosis.servers import ServerPool
from vllm_patches.diagnosis.verdict import ENGINE_MEETS, SILENT
from vllm_patches.errors import PatchToolError
from vllm_patches.probes import PROBES
from vllm_patches.series.manifest import CONNECTOR, load_manifest
from vllm_patches.targets.find import installed_vllm

STATIC = PROBES / "doctor_static.py"
"""doctor's static probe, run by path inside the target interpreter."""


def _lmcache_advice(vllm_version: str) -> str:
    """Which lmcache releases the shipped pairing table (``matrix/matrix.json``) says work."""
    release = Version(vllm_version).public
    manifest = load_manifest()
    if release not in manifest.releases:
        return manifest.not_carried(release)
    working = starts_with(shipped(), release, "patched")
    if working == "none":
        return (
            f"install an lmcache release whose connector fits vLLM {release} "
            "(README: Which connector will I get?)"
        )
    return f"with the series applied, install lmcache {working}"


def _brief(error: str) -> str:
    return re.sub(r" \(/[^)]*\)", "", error)


def _module_path_fix(module: str, vllm_version: str, *, patched: bool) -> str:
    """How to name ``module`` for ``LMCacheMPConnector``: ``kv_connector_module_path``, which
    vLLM honours from vllm-project/vllm#38301 on, and with the series applied (0008)."""
    release = Version(vllm_version)
    backport = load_manifest().patches["0008"]
    how = "name it"
    if not patched and release.release < Version(backport.first_release).release:
        how = (
            f"apply the series (vllm-patches apply --python PY; vLLM {release.public} ignores "
            "kv_connector_module_path without it), then name it"
        )
    config = {"kv_connector": "LMCacheMPConnector", "kv_connector_module_path": module}
    shown = json.dumps(config, separators=(",", ":"))[:-1] + ",...}"
    return f"{module} works here: {how} with --kv-transfer-config '{shown}'"


class StaticCandidate(TypedDict):
    """One candidate as ``probes/doctor_static.py`` checked it (no server, no device)."""

    module: str
    imports: bool
    subclass: bool
    builds: bool | None
    """The series' builtin passed its construction-time name checks of the installed lmcache's
    adapter API; None where no static check tells (lmcache's connectors, vLLM's own class)."""
    error: str


class StaticDiagnosis(TypedDict, total=False):
    """What ``probes/doctor_static.py`` prints for one lmcache (its ``DOCTOR`` line)."""

    vllm: str | None
    lmcache: str | None
    vllm_unmet: list[str]
    import_error: str
    checked: bool
    """The series' code could be asked (vLLM's module patched, or the overlay file imported)."""
    candidates: list[StaticCandidate]
    patched: bool
    builtin: StaticCandidate
    chosen: str
    resolution: dict[str, str]
    """What the series picks here (``class``), ``reason``, and its builtin's ``error``
    (``''`` unless it picks the builtin and that fails); on vLLM unpatched, once applied."""
    chosen_builds: bool | None
    """The chosen class passes the static check; None: no static check tells (vLLM's own
    class, unpatched), the pairing table may."""
    chosen_error: str
    module_path_route: dict[str, str]


@dataclass
class Diagnosis:
    """What doctor found, and its verdict."""

    data: StaticDiagnosis = field(default_factory=lambda: StaticDiagnosis())

    @property
    def measured(self) -> dict:
        """What the shipped pairing table measured for this vLLM and lmcache, on this side
        (unpatched or patched), with the serving-engine steps, where it chose the same class
        as here; ``{}`` when the table has no such measurement."""
        data = self.data
        if not data.get("vllm") or not data.get("lmcache") or "patched" not in data:
            return {}
        key = f"{Version(str(data['vllm'])).public}|{data['lmcache']}"
        side = shipped()["cells"].get(key, {}).get("patched" if data["patched"] else "unpatched")
        if not side or "verdict" not in side or side.get("chosen") != data.get("chosen"):
            return {}
        return side

    @property
    def fails_here(self) -> bool:
        """The connector module does not import, or the chosen class fails its static check."""
        return "import_error" in self.data or self.data.get("chosen_builds") is False

    @property
    def checked(self) -> bool:
        """Something measured this pairing: a static failure here, or the pairing table for the
        class chosen here (a static pass alone checks construction, not serving)."""
        return self.fails_here or bool(self.measured.get("verdict"))

    @property
    def ok(self) -> bool:
        """The pairing table measured that the class chosen here works (or serves)."""
        return not self.fails_here and self.measured.get("verdict") in ("works", "serves")

    def fixes(self) -> list[str]:
        """What to do when the verdict fails."""
        data = self.data
        if "import_error" in data:
            return [
                f"vLLM {data['vllm']}'s connector module does not import with lmcache "
                f"{data['lmcache']}; install an lmcache release of this vLLM's time"
            ]
        series = self._series_fix()
        if series:
            return [series]
        return [
            _lmcache_advice(str(data["vllm"])),
            "or run vllm-patches doctor --live: it builds each of lmcache's connectors here, "
            "and says how to name one that works",
        ]

    def _series_fix(self) -> str:
        """Apply the series, where vLLM is unpatched and what the series picks passes ('')."""
        series = self.data.get("resolution", {})
        if self.data.get("patched") or not series or series["error"]:
            return ""
        return f"apply the series (vllm-patches apply --python PY): it picks {series['class']}"

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
            keys = ("imports", "subclass", "builds")[: 2 if candidate["builds"] is None else 3]
            shown = keys[: next((i + 1 for i, k in enumerate(keys) if not candidate[k]), 3)]
            flags = ", ".join(f"{k} {'yes' if candidate[k] else 'no'}" for k in shown)
            error = f" ({_brief(candidate['error'])})" if candidate["error"] else ""
            out.append(f"  {candidate['module']}: {flags}{error}")
        if "chosen" in data:
            out.append(f"LMCacheMPConnector resolves to {data['chosen']}")
            for module, got in data.get("module_path_route", {}).items():
                out.append(f"  kv_connector_module_path={module} -> {got}")
        out += self._verdict()
        return out

    def _verdict(self) -> list[str]:
        """The verdict line and its fixes."""
        data = self.data
        measured = self.measured
        verdict = measured.get("verdict")
        if self.ok:
            return ["verdict: OK"]
        if not self.checked:
            built = (
                f"{data['chosen']} constructs here, but nothing static tells whether it serves"
                if data.get("chosen_builds")
                else f"nothing static tells whether vLLM {data['vllm']}'s own connector starts"
            )
            return [
                f"verdict: not checked: {built} with lmcache {data['lmcache']}, and the "
                "pairing table has not measured them together",
                "fix: check it here with vllm-patches doctor --live",
                f"fix: or {self._series_fix() or _lmcache_advice(str(data['vllm']))}",
            ]
        if self.fails_here:
            error = data.get("chosen_error") or data.get("import_error", "")
            lines = [f"verdict: will fail when the engine starts: {_brief(error)}"]
        elif verdict in SILENT:
            why = measured.get("steps", {}).get("geometry error") or measured.get("error", "")
            return [
                "verdict: it starts, but measured with the serving-engine steps (pairing "
                f"table) {ENGINE_MEETS[verdict]}: {_brief(str(why))}",
                f"fix: {_lmcache_advice(str(data['vllm']))}",
                "fix: or check it here with vllm-patches doctor --live",
            ]
        elif verdict and str(measured.get("error", "")).startswith("engine loop: "):
            lines = [
                "verdict: it starts, but measured through vLLM's scheduler loop (pairing table) "
                "it fails on its first requests: "
                + _brief(str(measured["error"]).removeprefix("engine loop: "))
            ]
        else:
            lines = [
                "verdict: will fail when the engine starts, measured with the serving-engine "
                f"steps (pairing table): {_brief(str(measured.get('error', '')))}"
            ]
        return lines + [f"fix: {fix}" for fix in self.fixes()]


def _overlay_for(version: str) -> str | None:
    """The series' connector file for vLLM ``version`` (whose code doctor asks when that vLLM
    is not patched); None for a release without a series."""
    try:
        release = load_manifest().release(version)
    except PatchToolError:
        return None
    group = next((g for g in release.groups if g.path == CONNECTOR), None)
    return str(group.overlay_file) if group else None


def _static(python: str | Path, layers: list[str | None], env: dict[str, str]) -> list[Diagnosis]:
    """Run the static probe once, vLLM imported once, a forked child per layer."""
    with tempfile.TemporaryDirectory(prefix="vllm-patches-doctor-") as tmp:
        spec = Path(tmp) / "spec.json"
        overlay = _overlay_for(installed_vllm(str(python)).version)  # no vLLM: one clear error
        spec.write_text(json.dumps({"layers": layers, "overlay": overlay}))
        full_env = {"LMCACHE_LOG_LEVEL": "ERROR", **env}
        proc = run_subprocess([python, STATIC, spec], env=full_env, what="doctor's probe")
    found = [
        Diagnosis(cast("StaticDiagnosis", data))
        for data in per_layer_results(proc.stdout, "DOCTOR")
    ]
    if len(found) != len(layers):
        msg = f"{python} did not answer as a Python interpreter; give the python of vLLM's venv"
        raise PatchToolError(msg)
    return found


def diagnose(
    python: str | Path, pythonpath: list[Path] | None = None, env: Mapping[str, str] | None = None
) -> Diagnosis:
    """Inspect the vLLM and lmcache installed in ``python``; nothing is built or contacted."""
    full_env = dict(env or {})
    if pythonpath:
        full_env["PYTHONPATH"] = ":".join(str(p) for p in pythonpath)
    (diagnosis,) = _static(python, [None], full_env)
    _require_vllm(python, diagnosis.data)
    return diagnosis


def _require_vllm(python: str | Path, data: Mapping[str, object]) -> None:
    if data.get("vllm") is None:
        msg = f"no vLLM is installed in {python}; give --python the interpreter of vLLM's venv"
        raise PatchToolError(msg)


def diagnose_layers(python: str | Path, layers: list[Path]) -> list[Diagnosis]:
    """``diagnose(python, [layer])`` for each layer, importing vLLM once for all of them.

    One process imports what every diagnosis shares (``vllm.config``: ~10 s of the ~11 s
    a diagnosis takes) and forks a child per layer, which imports lmcache from it alone.
    """
    return _static(python, [str(layer) for layer in layers], {})


GPU_ONLY = (
    "the KV cache registered by CUDA IPC, lmcache's GPU transfer kernels, GPU KV layouts, "
    "and a real model's numerics"
)
"""What a CPU run of vLLM's scheduler loop cannot check (said wherever its result is)."""


@dataclass
class LiveDiagnosis:
    """What building the connector for real against a server found, and its verdict."""

    data: LayerBuild = field(default_factory=lambda: LayerBuild())
    no_loop: str = ""
    """Why vLLM's scheduler loop was not run ('' where it was)."""

    @property
    def chosen(self) -> CandidateBuild:
        return self.data.get("chosen_build", {})

    @functools.cached_property
    def round_trip(self) -> str:
        """Where the loop's second wave got no hit: what the pairing table measured of a KV
        round trip on a CPU with this lmcache release ('' where it hit, or no loop ran)."""
        if self.chosen.get("engine_loop", {}).get("hit", True):
            return ""
        lmcache = str(self.data.get("lmcache") or "")
        release = Version(lmcache).public if lmcache else ""
        return cpu_round_trips(shipped()).get(release, "not measured by the pairing table")

    @property
    def ok(self) -> bool:
        possible = self.round_trip.startswith("possible")
        return "import_error" not in self.data and bool(works(self.chosen)) and not possible

    def fixes(self) -> list[str]:
        """What to do when the engine would fail."""
        data = self.data
        if "Cannot reach the LMCache MP server" in self.chosen.get("error", ""):
            # Measured: a 0.4.7 server does not answer a 0.5.6 client, which then says this.
            return [
                f"check that a server listens at {data.get('server')} and runs the same lmcache "
                f"release as this environment ({data.get('lmcache')}); the message queue does "
                "not tell a server's release, and a server of another release may not answer"
            ]
        working = [
            c["module"] for c in data.get("candidates", []) if works(c) and not c.get("builtin")
        ]
        if not data.get("vllm"):
            return []
        vllm = str(data["vllm"])
        fixes = [_module_path_fix(m, vllm, patched=bool(data.get("patched"))) for m in working]
        unpatched = not data.get("patched")
        if not fixes and unpatched and _overlay_for(Version(vllm).public) is not None:
            fixes.append(
                "apply the series (vllm-patches apply --python PY), then run doctor --live again"
            )
        return fixes or [_lmcache_advice(vllm)]

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
            out.append(f"  {candidate['module']}: {_brief(built_text(candidate))}")
        if "chosen" in data:
            out.append(f"LMCacheMPConnector resolves to {data['chosen']}")
        chosen = self.chosen
        if self.ok:
            out.append(f"scheduler round trip: {chosen.get('round_trip', '')}")
            out.append(f"worker driven: {worker_reached(chosen)}")
            out.append(f"geometry ({data.get('geometry_of', '')}): as it must, MLA off and on")
            if "engine_loop" in chosen:
                out.append(f"vLLM's scheduler loop: {loop_text(chosen['engine_loop'])}")
                if self.round_trip:
                    out.append(f"KV round trip on a CPU (pairing table): {self.round_trip}")
                out.append(f"only a GPU confirms: {GPU_ONLY}")
            else:
                out.append(f"the first lookup again: {chosen.get('second_lookup', '')}")
                out.append(f"vLLM's scheduler loop: not checked ({self.no_loop})")
                out += [f"not run on a CPU: {call}: {why}" for call, why in _not_on_a_cpu(data)]
            out.append("verdict: OK")
        else:
            out.append(f"verdict: {_failure(data, chosen)}")
            out += [f"fix: {fix}" for fix in self.fixes()]
        return out


def _not_on_a_cpu(data: LayerBuild) -> list[tuple[str, str]]:
    return [
        (call, why.removeprefix("not run here: "))
        for call, why in data.get("not_on_a_cpu", {}).items()
    ]


def _failure(data: LayerBuild, chosen: CandidateBuild) -> str:
    """The live verdict's sentence where the engine would not serve."""
    if "import_error" in data:
        return f"will fail when the engine starts: {_brief(data['import_error'])}"
    what = chosen.get("verdict")
    loop = chosen.get("engine_loop")
    if loop is not None and loop.get("verdict") == "serves" and not loop.get("hit", True):
        return (
            f"the engine would serve without its cache: vLLM's scheduler loop {loop_text(loop)}, "
            f"where the pairing table loaded equal bytes with lmcache {data.get('lmcache')}"
        )
    if loop is not None and loop.get("verdict") != "serves":
        sentence = ENGINE_MEETS[loop.get("verdict", "raises")]
        return f"{sentence}: vLLM's scheduler loop {loop_text(loop)}"
    if what == "hangs":
        return f"{ENGINE_MEETS['hangs']}: {_brief(chosen.get('hangs', ''))}"
    if what == "wrong geometry":
        return f"{ENGINE_MEETS['wrong geometry']}: {chosen.get('geometry_error', '')}"
    return f"will fail when the engine starts: {_brief(chosen.get('error', ''))}"


def live_check(python: str | Path, server: str | None = None) -> LiveDiagnosis:
    """Build the candidates in ``python`` for real against ``server``.

    :param server: the deployment's LMCache server (``tcp://HOST:PORT``); None starts one of
        the installed lmcache on loopback for the check and stops it afterwards.
    """
    release = installed_vllm(str(python)).version  # a clear error where there is no vLLM
    helpers, missing = scheduler_helpers(release)
    with stopped_on_signals(), ServerPool() as pool:
        if server is None:
            running = pool.get(Path(python), None, f"installed in {python}")
            if isinstance(running, str):
                msg = f"{running}; give --server URL to check against a running server"
                raise PatchToolError(msg)
            server = running.url
        (data,) = build_layers(python, [Layer(None, server)], helpers=helpers)
    _require_vllm(python, data)
    return LiveDiagnosis(data, missing)
