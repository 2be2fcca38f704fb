"""Run vLLM's own connector unit tests on one installed release, unpatched and then patched."""

from __future__ import annotations

import json
import shutil
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_patches import _journal as journal
from vllm_patches._fs import write_atomic
from vllm_patches._proc import run_subprocess
from vllm_patches.errors import PatchToolError, ReportedError
from vllm_patches.probes import PROBES
from vllm_patches.series.manifest import load_manifest
from vllm_patches.series.overlay import group_results
from vllm_patches.sources.releases import cache_root, fetch_sdist
from vllm_patches.sources.venvs import default_lmcache, vllm_env
from vllm_patches.targets.apply import apply, recover, status
from vllm_patches.targets.files import journal_of
from vllm_patches.targets.find import Target, installed_vllm

UNIT_DIR = "tests/v1/kv_connector/unit"
CLEANUP_PLUGIN = PROBES / "plugins" / "vllm_patches_cleanup.py"
"""A pytest plugin given to vLLM's own test runs (see its docstring)."""
# facebook/opt-125m's public config.json (model card values; no weights): most of vLLM's
# connector tests build a ModelConfig for it, and the hub is not reachable here.
OPT_125M_CONFIG = {
    "_name_or_path": "facebook/opt-125m",
    "activation_dropout": 0.0,
    "activation_function": "relu",
    "architectures": ["OPTForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "do_layer_norm_before": True,
    "dropout": 0.1,
    "eos_token_id": 2,
    "ffn_dim": 3072,
    "hidden_size": 768,
    "init_std": 0.02,
    "layerdrop": 0.0,
    "max_position_embeddings": 2048,
    "model_type": "opt",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "prefix": "</s>",
    "torch_dtype": "float16",
    "transformers_version": "4.21.0.dev0",
    "use_cache": True,
    "vocab_size": 50272,
    "word_embed_proj_dim": 768,
}
GPU_HINTS = ("cuda", "gpu", "nvidia", "nccl", "device type", "triton")
RESOLUTION_TESTS = "test_lmcache_mp_connector_resolution"
"""The series' test file of the builtin class and the resolution (0003, 0005): what goes
upstream with 0002 and 0004."""
SERIES_TESTS = (
    RESOLUTION_TESTS,
    "test_lmcache_mp_connector_copies",
    "test_kv_connector_factory_module_path",
)
"""The series' own test files in vLLM's tree; 0012 tests the copy table of the 0.20/0.21
bases, 0010 the factory."""


@dataclass
class Run:
    """One pytest run: outcome per test id, and its wall time."""

    outcomes: dict[str, str] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        return dict(sorted(counts.items()))

    def counts_text(self) -> str:
        """``3 failed, 80 passed``: the counts, for a line or a table cell."""
        return ", ".join(f"{n} {k}" for k, n in self.counts().items())

    def of(self, files: tuple[str, ...] = SERIES_TESTS) -> dict[str, str]:
        """Outcome per test id of the tests in ``files`` (file names without ``.py``)."""
        return {t: o for t, o in self.outcomes.items() if any(f in t for f in files)}


@dataclass
class Report:
    """Baseline vs patched."""

    version: str
    lmcache: str
    baseline: Run
    patched: Run
    regressions: list[str]
    collection_errors: dict[str, str]

    def summary(self) -> list[str]:
        """Counts per run and of the series' own tests, one line each.

        :raises ReportedError: (with these lines) on a regression, or when the series' own
            tests did not all pass (or did not run).
        """
        lines = []
        for name, run in (("baseline", self.baseline), ("patched", self.patched)):
            lines.append(f"{name}: {run.counts_text()} in {run.seconds:.1f} s")
        own = list(self.patched.of().values())
        failed = [o for o in own if o not in ("passed", "skipped")]
        lines.append(
            f"the series' own tests: {own.count('passed')} passed, "
            f"{own.count('skipped')} skipped, {len(failed)} failed"
        )
        if self.regressions:
            msg = f"{len(self.regressions)} regressions, first {self.regressions[0]}"
            raise ReportedError(msg, "\n".join(lines))
        if failed or not own:
            msg = "the series' own tests did not all pass; see the report"
            raise ReportedError(msg, "\n".join(lines))
        return lines

    def markdown(self) -> str:
        lines = [
            f"# vLLM {self.version} connector unit tests (`-m cpu_test`), lmcache {self.lmcache}",
            "",
            "| run | wall | counts |",
            "|---|---|---|",
        ]
        for name, run in (("baseline", self.baseline), ("patched", self.patched)):
            lines.append(f"| {name} | {run.seconds:.1f} s | {run.counts_text()} |")
        lines += ["", f"Regressions (pass -> not pass): {len(self.regressions)}", ""]
        lines += [f"- `{t}`" for t in self.regressions]
        if self.collection_errors:
            lines += ["", "Collection errors:", ""]
            lines += [f"- `{t}`: {why}" for t, why in self.collection_errors.items()]
        lines += ["", "| test | baseline | patched |", "|---|---|---|"]
        for test in sorted(set(self.baseline.outcomes) | set(self.patched.outcomes)):
            base = self.baseline.outcomes.get(test, "-")
            lines.append(f"| `{test}` | {base} | {self.patched.outcomes.get(test, '-')} |")
        return "\n".join(lines) + "\n"


def _hf_home(root: Path) -> Path:
    home = root / "hf"
    snapshot = home / "hub" / "models--facebook--opt-125m" / "snapshots" / "local"
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "config.json").write_text(json.dumps(OPT_125M_CONFIG, indent=2))
    (home / "hub" / "models--facebook--opt-125m" / "refs").mkdir(exist_ok=True)
    (home / "hub" / "models--facebook--opt-125m" / "refs" / "main").write_text("local")
    return home


def _sources(version: str, root: Path) -> Path:
    """vLLM's tests/, examples/ (some tests load them) and pyproject.toml (it declares the
    cpu_test marker) from the sdist."""
    src = root / "src"
    if src.is_dir():
        shutil.rmtree(src)
    with tarfile.open(fetch_sdist(version)) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.name.split("/", 1)[-1].startswith(("tests/", "examples/", "pyproject.toml"))
        ]
        tar.extractall(root / "unpack", members=members, filter="data")
    (root / "unpack" / f"vllm-{version}").rename(src)
    shutil.rmtree(root / "unpack")
    return src


def _parse_junit(path: Path) -> Run:
    run = Run()
    if not path.is_file():
        return run
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                text = f"{child.get('message') or ''}: {child.text or ''}"
                run.messages[test] = text[:2000]
        run.outcomes[test] = outcome
    return run


def _pytest(
    python: Path, src: Path, work: Path, paths: list[str], *, ignore: list[str], name: str
) -> Run:
    junit = work / f"{name}.xml"
    junit.unlink(missing_ok=True)
    scratch = work / "tmp"
    scratch.mkdir(exist_ok=True)
    args = [
        python, "-m", "pytest", "-m", "cpu_test", "--import-mode=importlib",
        "-p", "no:cacheprovider", "-p", CLEANUP_PLUGIN.stem, f"--rootdir={src}",
        f"--junitxml={junit}", "-q",
        *(str(src / p) for p in paths),
    ]  # fmt: skip
    args += [f"--ignore={src / path}" for path in ignore]
    env = {
        # vllm_patches_cleanup: vLLM's clean-up on its unspecified platform (see there).
        "PYTHONPATH": str(CLEANUP_PLUGIN.parent),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(_hf_home(work)),
        "TMPDIR": str(scratch),
        "RAY_TMPDIR": str(scratch),
        "VLLM_CACHE_ROOT": str(scratch / "vllm"),
    }
    start = time.monotonic()
    proc = run_subprocess(args, cwd=work, env=env, check=False, what="pytest")
    run = _parse_junit(junit)
    run.seconds = time.monotonic() - start
    if proc.returncode not in (0, 1, 5) and not run.outcomes:
        msg = f"vLLM's tests did not run (pytest exit {proc.returncode}): {proc.stdout[-500:]}"
        raise PatchToolError(msg)
    return run


@contextmanager
def _installed(site: Target, files: dict[str, bytes | None]) -> Iterator[None]:
    """Lay ``files`` over the installed vLLM for the duration, then put the originals back.

    Written under the target's journal: a run killed in between is rolled back by the next
    command on that install (this one, vllm-patches apply, matrix), so the cached venv heals.
    """
    root = site.root
    writes = {root / p: d for p, d in files.items()}
    with journal.temporarily(journal_of(site), root, writes, "a test run's files"):
        yield


def run_vllm_tests(
    version: str,
    lmcache: str | None = None,
    out: Path | None = None,
    *,
    change: dict[str, bytes | None] | None = None,
    paths: list[str] | None = None,
) -> Report:
    """Run vLLM's connector unit tests baseline vs patched on one install and write the report.

    :param change: the files to test (path in vLLM's tree -> bytes); by default the
        release's series.
    :param paths: the test files or directories to run (default: vLLM's connector unit
        tests); the change's new test files always run.
    :returns: the report; ``regressions`` lists tests that passed unpatched and not patched.
    """
    manifest = load_manifest()
    release = manifest.release(version)
    fetch_sdist(version)  # vLLM's tests come from it: refused first where it ships none
    if change is None:
        change = {g.path: group_results(g)[1][-1] for g in release.groups}
    lmcache = lmcache or default_lmcache(version)
    # A venv of its own: the test dependencies and the laid-over files never touch the venv
    # that the pairing table, doctor and the deploy test use.
    python = vllm_env(version, lmcache, test_deps=True)
    site = installed_vllm(str(python))
    recover(site)
    if status(site, manifest).overall != "unpatched":
        apply(site, revert=True)
    work = cache_root() / "vllm-tests" / version
    work.mkdir(parents=True, exist_ok=True)
    src = _sources(version, work)
    tests = {p: d for p, d in change.items() if not p.startswith("vllm/")}
    # New test files (the series' 0003 and 0005, 0010) run only patched.
    new_tests = [p for p in tests if not (src / p).is_file()]
    paths = paths or [UNIT_DIR]
    extra = [p for p in new_tests if not any(p.startswith(d.rstrip("/") + "/") for d in paths)]
    baseline = _pytest(python, src, work, paths, ignore=new_tests, name="baseline")
    for path, data in tests.items():
        write_atomic(src / path, data)
    installed = {p: d for p, d in change.items() if p.startswith("vllm/")}
    with _installed(site, installed):
        patched = _pytest(python, src, work, paths + extra, ignore=[], name="patched")
    regressions = sorted(
        t
        for t, outcome in baseline.outcomes.items()
        if outcome == "passed" and patched.outcomes.get(t) != "passed"
    )
    collection = {
        t: ("needs GPU/CUDA: " if any(h in msg.lower() for h in GPU_HINTS) else "")
        + msg.splitlines()[-1][:200]
        for run in (baseline, patched)
        for t, msg in run.messages.items()
        if msg.startswith("collection failure")
    }
    report = Report(version, lmcache, baseline, patched, regressions, collection)
    out = out or Path.cwd() / f"vllm-tests-{version}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report.markdown())
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report
