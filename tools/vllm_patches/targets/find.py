"""What a target is: a vLLM git checkout, a plain source tree, or an installed vLLM."""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from packaging.version import Version

from vllm_patches._git import is_git_worktree, run_git
from vllm_patches._proc import run_subprocess
from vllm_patches.errors import PatchToolError
from vllm_patches.probes import PROBES
from vllm_patches.sources.releases import parse_version

TargetKind = Literal["git", "tree", "site"]

QUERY = PROBES / "vllm_dist.py"


@dataclass(frozen=True)
class Target:
    """A place the series can go."""

    kind: TargetKind
    root: Path
    """The tree's top level, or the site-packages directory."""
    version: str
    """The vLLM release (public version, no local label)."""
    dist_info: Path | None = None
    """The ``vllm-X.dist-info`` directory, for installed targets."""

    def describe(self) -> str:
        what = {"git": "git checkout", "tree": "source tree", "site": "installed vLLM"}[self.kind]
        return f"{what} {self.root} (vLLM {self.version})"


def _public(version: str) -> str:
    return Version(version).public


def _pkg_info_version(root: Path) -> str | None:
    pkg_info = root / "PKG-INFO"
    if pkg_info.is_file():
        match = re.search(r"^Version: (\S+)$", pkg_info.read_text(errors="replace"), re.M)
        if match:
            return _public(match.group(1))
    return None


def _git_version(root: Path) -> str | None:
    out = run_git(["describe", "--tags", "--abbrev=0", "--match", "v[0-9]*"], root, check=False)
    tag = out.strip()
    return _public(tag[1:]) if tag else None


def _is_checkout(root: Path) -> bool:
    """Whether ``root`` is a git checkout; a plain tree needs no git, a checkout does."""
    if shutil.which("git") is not None:
        return is_git_worktree(root)
    if (root / ".git").exists():
        msg = (
            f"{root} is a git checkout but git is not installed or not on PATH; install git, "
            "or patch an unpacked sdist or an installed vLLM instead"
        )
        raise PatchToolError(msg)
    return False


def installed_vllm(python: str) -> Target:
    """The vLLM installed in interpreter ``python``."""
    proc = run_subprocess([python, QUERY], what=f"{python} (looking up vllm)")
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        msg = f"{python} did not answer as a Python interpreter; give the python of vLLM's venv"
        raise PatchToolError(msg) from None
    if info is None:
        msg = f"no vllm is installed in {python}; install vLLM there first or pick another --python"
        raise PatchToolError(msg)
    dist_info = Path(info["dist_info"])
    if not (dist_info / "RECORD").is_file():
        msg = f"{dist_info} has no RECORD; reinstall vLLM with pip before patching it"
        raise PatchToolError(msg)
    return Target("site", Path(info["site"]), _public(info["version"]), dist_info)


def resolve_target(
    path: Path | None, *, site: bool = False, python: str | None = None, version: str | None = None
) -> Target:
    """Work out what the user pointed at, and its vLLM version.

    :param path: a vLLM checkout or source tree.
    :param site: the vLLM installed in the running interpreter.
    :param python: the vLLM installed in that interpreter.
    :param version: overrides the detected version.
    """
    if site or python:
        target = installed_vllm(python or sys.executable)
    else:
        if path is None:
            msg = "give a vLLM tree, --site or --python PATH"
            raise PatchToolError(msg)
        root = path.resolve()
        if not (root / "vllm" / "__init__.py").is_file():
            msg = (
                f"{path} is not a vLLM source tree (no vllm/__init__.py); pass a vLLM checkout, "
                "an unpacked sdist, or --site/--python for an installed vLLM"
            )
            raise PatchToolError(msg)
        kind: TargetKind = "git" if _is_checkout(root) else "tree"
        detected = (_git_version(root) if kind == "git" else None) or _pkg_info_version(root)
        if detected is None and version is None:
            msg = (
                f"cannot tell which vLLM release {path} is (no vX.Y.Z tag, no PKG-INFO); "
                "pass --vllm-version"
            )
            raise PatchToolError(msg)
        target = Target(kind, root, detected or "")
    if version:
        parse_version(version)
        target = Target(target.kind, target.root, _public(version), target.dist_info)
    return target
