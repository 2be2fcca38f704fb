"""Every git call goes through :func:`run_git`."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_patches._proc import run_subprocess
from vllm_patches.errors import PatchToolError

# A fixed identity and dates so that trees made by the tools are reproducible.
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "vllm-lmcache-mp",
    "GIT_AUTHOR_EMAIL": "vllm-lmcache-mp@localhost",
    "GIT_COMMITTER_NAME": "vllm-lmcache-mp",
    "GIT_COMMITTER_EMAIL": "vllm-lmcache-mp@localhost",
}


def run_git(
    args: Sequence[str | os.PathLike[str]],
    cwd: Path,
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> str:
    """Run ``git args`` in ``cwd`` and return its stdout.

    :raises PatchToolError: on a non-zero exit, with the command and the tail of stderr.
    """
    proc = run_subprocess(["git", *args], cwd=cwd, env=env, check=check, what=f"git {args[0]}")
    return proc.stdout


def run_git_unchecked(
    args: Sequence[str | os.PathLike[str]],
    cwd: Path,
    *,
    env: Mapping[str, str] | None = None,
    text: bool = True,
) -> subprocess.CompletedProcess[Any]:
    """Run ``git args`` in ``cwd`` whatever its exit; the caller reads ``returncode``."""
    return run_subprocess(["git", *args], cwd=cwd, env=env, check=False, text=text)


def git_ok(args: Sequence[str | os.PathLike[str]], cwd: Path) -> bool:
    """Whether ``git args`` exits 0."""
    return run_subprocess(["git", *args], cwd=cwd, check=False).returncode == 0


def is_git_worktree(path: Path) -> bool:
    """Whether ``path`` is the top level of a git work tree."""
    proc = run_subprocess(["git", "rev-parse", "--show-toplevel"], cwd=path, check=False)
    return proc.returncode == 0 and Path(proc.stdout.strip()).resolve() == path.resolve()


def current_ref(root: Path) -> str:
    """The branch checked out in ``root``, or the commit when HEAD is detached."""
    name = run_git(["symbolic-ref", "--short", "-q", "HEAD"], root, check=False).strip()
    return name or run_git(["rev-parse", "HEAD"], root).strip()


def tracked_changes(root: Path) -> list[str]:
    """Tracked files of ``root`` with changes not committed."""
    out = run_git(["status", "--porcelain", "--untracked-files=no"], root)
    return [line[3:] for line in out.splitlines() if line.strip()]


def require_tagged_checkout(tree: Path, tag: str) -> Path:
    """``tree`` if it is the top of a git work tree with ``tag``, else a clear error."""
    if not is_git_worktree(tree):
        msg = f"--checkout {tree} is not the top of a git work tree"
        raise PatchToolError(msg)
    if not git_ok(["rev-parse", "--verify", "-q", f"refs/tags/{tag}"], tree):
        msg = f"--checkout {tree} has no tag {tag}; tag the release commit first"
        raise PatchToolError(msg)
    return tree
