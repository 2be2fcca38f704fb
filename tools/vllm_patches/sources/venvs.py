"""Cached virtual environments holding a real vLLM (built from its sdist) and a real lmcache."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from vllm_patches._proc import logger, run_subprocess
from vllm_patches.sources.releases import (
    cache_root,
    download_wheel,
    fetch_sdist,
    has_sdist,
    wheel_requirements,
)

TORCH = "torch==2.13.0"
BUILD_DEPS = (
    "setuptools>=77,<81",
    "setuptools-scm",
    "setuptools-rust",  # vLLM 0.22.0 and later import it in setup.py
    "wheel",
    "packaging",
    "ninja",
    "cmake",
    "jinja2",
)
# An lmcache release of each vLLM release's time whose pins fit vLLM's, with which the
# patched vLLM imports (and starts, where the server runs here: matrix/matrix.json); each
# applies from the vLLM release it names. lmcache 0.4.5 and later need transformers >= 5.4,
# which vLLM up to 0.19.0 pins below 5; before 0.4.4 lmcache has no adapter for the builtin.
# From vLLM 0.34.0 no lmcache fits its pins (it needs opentelemetry-api >= 1.45.1, every
# lmcache up to 0.5.6 pins <= 1.40.0): 0.5.6 is installed beside it all the same.
DEFAULT_LMCACHE = (
    ("0.12", "0.3.9.post2"),
    ("0.14", "0.3.13"),
    ("0.17", "0.4.4"),
    ("0.19.1", "0.5.3"),
    ("0.22", "0.5.6"),
)
# vLLM labels a CPU build "+cpu", and its CPU platform then refuses to start on x86 without
# triton-cpu from 0.34.0 on (a wheel no package index serves); those releases keep the
# "+empty" label, on which vLLM runs its unspecified platform (no device code is needed here).
CPU_LABEL_BEFORE = Version("0.34.0")
# What an official (CUDA) wheel requires that is built for its own torch and CUDA: the venv
# keeps TORCH instead.
GPU_ONLY = frozenset({"torch", "torchaudio", "torchvision", "flashinfer-python", "xformers"})
# What vLLM's own connector tests need beyond vLLM itself (tests/conftest.py, ray, msgpack users).
TEST_DEPS = ("pytest", "pytest-asyncio", "tblib", "msgpack", "ray")


def default_lmcache(version: str) -> str:
    """An lmcache release that fits vLLM ``version``'s pins and that the patched vLLM imports
    with (:data:`DEFAULT_LMCACHE`)."""
    chosen = DEFAULT_LMCACHE[0][1]
    for first, lmcache in DEFAULT_LMCACHE:
        if Version(version) >= Version(first):
            chosen = lmcache
    return chosen


def build_label(version: str) -> str:
    """The local label a CPU build of vLLM ``version`` gets here (:data:`CPU_LABEL_BEFORE`)."""
    return "cpu" if Version(version) < CPU_LABEL_BEFORE else "empty"


def pip(python: Path, *args: str, env: dict[str, str] | None = None) -> None:
    """Run pip of ``python``; pip's own configuration (index, proxy, certs) applies."""
    run_subprocess(
        [python, "-m", "pip", "--disable-pip-version-check", *args],
        env=env,
        what=f"pip {' '.join(args[:3])}",
    )


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_dir(version: str, lmcache: str | None, *, test_deps: bool = False) -> Path:
    """Where :func:`vllm_env` caches that venv; it is complete once it holds ``.complete``."""
    name = f"vllm-{version}-lmcache-{lmcache or 'none'}{'-tests' if test_deps else ''}"
    return cache_root() / "venvs" / name


def vllm_env(version: str, lmcache: str | None, *, test_deps: bool = False) -> Path:
    """A cached venv with vLLM ``version`` (``empty`` target) and lmcache.

    :param version: the vLLM release; built from its sdist as ``X+cpu`` (see :func:`build_label`),
        or, for a release that ships wheels only, its official wheel.
    :param lmcache: the lmcache release to install, or None for none.
    :param test_deps: also install what vLLM's connector unit tests need.
    :returns: the venv's python.
    """
    venv = venv_dir(version, lmcache, test_deps=test_deps)
    python = venv_python(venv)
    marker = venv / ".complete"
    if marker.is_file():
        return python
    with _building(venv):
        if marker.is_file():  # another process built it while this one waited
            return python
        _build(venv, version, lmcache, test_deps=test_deps)
    return python


@contextlib.contextmanager
def _building(venv: Path) -> Iterator[None]:
    """Hold the lock of ``venv``'s build: one process builds a venv, the others wait for it
    (two builders would remove each other's half-built trees)."""
    lock = venv.parent / ".locks" / f"{venv.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("waiting for another process that builds %s", venv)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _build(venv: Path, version: str, lmcache: str | None, *, test_deps: bool) -> None:
    """Build ``venv`` anew (what an interrupted build left is removed first)."""
    python = venv_python(venv)
    marker = venv / ".complete"
    if venv.exists():
        shutil.rmtree(venv)
    logger.warning("building %s (a few minutes, cached afterwards)", venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    run_subprocess([sys.executable, "-m", "venv", venv], what="python -m venv")
    try:
        if has_sdist(version):
            _build_from_sdist(python, version)
        else:
            _install_official_wheel(python, version)
        extra = [f"lmcache=={lmcache}"] if lmcache else []
        if test_deps:
            extra += TEST_DEPS
        if extra:
            pip(python, "install", "-q", TORCH, *extra)
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    marker.write_text(f"vllm {version}\nlmcache {lmcache}\n")
    share_identical_files(venv.parent)


def share_identical_files(venvs: Path) -> None:
    """Hard-link the files that the complete venvs under ``venvs`` hold byte for byte.

    torch, triton and most of vLLM's requirements are the same in every venv: a dozen venvs
    then take the disk of a few (a CI machine's disk filled without this). util-linux's
    ``hardlink`` does it, where it is installed; without it nothing changes. The venvs stay
    independent: pip and ``apply`` replace a file by a new one, never write into it.
    """
    tool = shutil.which("hardlink")
    complete = sorted(marker.parent for marker in venvs.glob("*/.complete"))
    if tool is None or len(complete) < 2:
        return
    done = run_subprocess(
        [tool, "--quiet", "--ignore-time", "--minimum-size", "64K", *complete], check=False
    )
    if done.returncode:
        logger.warning("hardlink left the cached venvs' copies apart: %s", done.stderr.strip())


def _build_from_sdist(python: Path, version: str) -> None:
    """vLLM ``version`` built from its sdist for the ``empty`` target, beside :data:`TORCH`."""
    sdist = fetch_sdist(version)
    pip(python, "install", "-q", TORCH, *BUILD_DEPS)
    build_env = {
        "VLLM_TARGET_DEVICE": "empty",
        "VLLM_VERSION_OVERRIDE": f"{version}+{build_label(version)}",
        "MAX_JOBS": str(os.cpu_count() or 2),
    }
    pip(python, "install", "-q", "--no-build-isolation", str(sdist), env=build_env)


def _install_official_wheel(python: Path, version: str) -> None:
    """vLLM ``version``'s official wheel (a release without an sdist), beside :data:`TORCH`.

    The wheel is a CUDA build: its compiled ops do not load here and its CUDA-only
    requirements (:data:`GPU_ONLY`) are left out; vLLM then runs its unspecified platform,
    as an ``empty`` build does.
    """
    wheel = download_wheel(version)
    needs = [
        str(req)
        for req in map(Requirement, wheel_requirements(version))
        if canonicalize_name(req.name) not in GPU_ONLY
        and (req.marker is None or req.marker.evaluate({"extra": ""}))
    ]
    pip(python, "install", "-q", TORCH, *needs)
    pip(python, "install", "-q", "--no-deps", str(wheel))


def lmcache_layer(python: Path, lmcache: str) -> Path:
    """lmcache ``lmcache`` installed alone (``--no-deps``) into a directory of its own.

    Put first on ``PYTHONPATH``, it replaces the venv's lmcache without a venv per release.
    """
    layer = cache_root() / "lmcache-layers" / f"lmcache-{lmcache}"
    if (layer / ".complete").is_file():
        return layer
    if layer.exists():
        shutil.rmtree(layer)
    try:
        pip(python, "install", "-q", "--no-deps", "--target", str(layer), f"lmcache=={lmcache}")
    except BaseException:
        shutil.rmtree(layer, ignore_errors=True)
        raise
    (layer / ".complete").write_text(f"lmcache {lmcache}\n")
    return layer
