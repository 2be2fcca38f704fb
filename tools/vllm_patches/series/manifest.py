"""The patch series: ``patches/series.toml``, its groups, and what each release gets.

A *group* is the chain of patches made against one distinct base of one file (for
example ``connector-0.18.0``: ``lmcache_mp_connector.py`` as shipped from 0.18.0 to
0.19.1). A release's *series* is the patches of its groups in number order, so a
patch is stored once however many releases share its base.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import Version

from vllm_patches.errors import PatchToolError


def _data_root() -> Path:
    """Where ``patches/``, ``vllm_overlay/`` and ``matrix/`` are: the top level of a clone of
    this project, or the read-only copy inside the installed package (``vllm_patches/data``)."""
    clone = Path(__file__).resolve().parents[3]
    if (clone / "patches" / "series.toml").is_file():
        return clone
    return Path(str(importlib.resources.files("vllm_patches"))) / "data"


REPO_ROOT = _data_root()
IN_CLONE = REPO_ROOT.name != "data" or (REPO_ROOT / ".git").exists()
"""Whether the series is a contributor's clone (writable, with git) or the installed copy."""
PATCHES_DIR = REPO_ROOT / "patches"
OVERLAY_DIR = REPO_ROOT / "vllm_overlay"
MANIFEST = PATCHES_DIR / "series.toml"

CONNECTOR = "vllm/distributed/kv_transfer/kv_connector/v1/lmcache_mp_connector.py"
FACTORY = "vllm/distributed/kv_transfer/kv_connector/factory.py"
PATCH_NAME = re.compile(r"^(\d{4})-[\w.-]+\.patch$")


def branch_name(version: str) -> str:
    """The branch the series of vLLM ``version`` is applied on, in a git checkout."""
    return f"vllm-lmcache-mp/v{version}"


def require_clone(what: str) -> None:
    """Refuse a contributor workflow where the series is the installed, read-only copy."""
    if not IN_CLONE:
        msg = (
            f"{what} changes the series, so it needs a clone of vllm-lmcache-mp: in the clone, "
            f"run pip install -e '.[contrib]', then {what} there; this installed copy is "
            "read-only"
        )
        raise PatchToolError(msg)


def require_contrib(what: str) -> None:
    """Refuse a contributor workflow whose tools (pre-commit, pyyaml) are not installed."""
    missing = [n for n in ("pre_commit", "yaml") if importlib.util.find_spec(n) is None]
    if missing:
        msg = (
            f"{what} runs vLLM's pre-commit hooks and needs pre-commit and pyyaml; install them "
            "with pip install -e '.[contrib]' in a clone of vllm-lmcache-mp"
        )
        raise PatchToolError(msg)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(data: bytes | None) -> str:
    """A file's sha256 as the manifest records it: ``""`` for a file that is not there."""
    return sha256_bytes(data) if data is not None else ""


@dataclass(frozen=True)
class PatchInfo:
    """One logical change, by number (``0001``), whichever groups carry it."""

    number: str
    title: str
    upstream: str = ""
    """The upstream PR (``vllm-project/vllm#42596``), if it has one."""
    first_release: str = ""
    """The first vLLM release that contains the change, if upstream took it."""
    only_before: str = ""
    """The first vLLM release the change is not made for (the code it answers is gone there):
    a rebase onto it or a later one leaves the patch out."""


@dataclass(frozen=True)
class Group:
    """The patches made against one distinct base of one file."""

    name: str
    path: str
    """The file, relative to vLLM's tree."""
    base_release: str
    """A release whose sdist has this base (used to regenerate the overlay)."""
    base_sha256: str
    """sha256 of the file before any patch; empty for a file the group creates."""
    patches: tuple[str, ...]
    """Patch files relative to ``patches/``, in apply order."""
    results: tuple[str, ...]
    """sha256 of the file after each patch."""

    @property
    def numbers(self) -> tuple[str, ...]:
        return tuple(Path(p).name[:4] for p in self.patches)

    @property
    def overlay_file(self) -> Path:
        return OVERLAY_DIR / self.name / self.path

    @property
    def installed(self) -> bool:
        """Whether the file is part of the installed package (``vllm/``), not a test."""
        return self.path.startswith("vllm/")

    def state(self, data: bytes | None) -> tuple[str, int]:
        """Classify the file's bytes: ``("unpatched"|"patched"|"partial"|"modified", n)``.

        ``n`` is how many of the group's patches the bytes carry.
        """
        digest = file_sha256(data)
        if digest == self.base_sha256:
            return "unpatched", 0
        for index, result in enumerate(self.results, start=1):
            if digest == result:
                return ("patched" if index == len(self.results) else "partial"), index
        return "modified", 0


@dataclass(frozen=True)
class Release:
    """What one supported vLLM release gets."""

    version: str
    groups: tuple[Group, ...]
    upstream: tuple[str, ...] = ()
    """Numbers of patches this release already contains."""
    wheel_only: bool = False
    """The release ships wheels only (no sdist, so no tests): it gets the groups whose base
    its official wheel's files equal, byte for byte, and no test patches."""

    @property
    def patch_files(self) -> list[Path]:
        """The release's series, in apply order."""
        files = [PATCHES_DIR / p for g in self.groups for p in g.patches]
        return sorted(files, key=lambda p: (p.name[:4], str(p)))

    @property
    def branch(self) -> str:
        return branch_name(self.version)


@dataclass
class Manifest:
    """The parsed ``patches/series.toml``."""

    patches: dict[str, PatchInfo]
    groups: dict[str, Group]
    releases: dict[str, Release]
    unsupported: dict[str, str] = field(default_factory=dict)
    """Releases known not to be supported, with the reason."""

    def release(self, version: str) -> Release:
        """The release ``version``, or a clear error for one without a series."""
        if version in self.releases:
            return self.releases[version]
        known = sorted(self.releases, key=Version)
        if version in self.unsupported:
            msg = f"vLLM {version} is not supported: {self.unsupported[version]}"
        elif Version(version) < Version(known[0]):
            msg = (
                f"vLLM {version} has no series: releases before {known[0]} do not ship "
                f"{CONNECTOR} as this series patches it; use {known[0]} or later"
            )
        else:
            msg = self.not_carried(version)
        raise PatchToolError(msg)

    def groups_for(self, path: str) -> list[Group]:
        """Every group of one file."""
        return [g for g in self.groups.values() if g.path == path]

    def same_files(self, files: dict[str, bytes | None]) -> Release | None:
        """The newest release whose vLLM files (its groups outside ``tests/``) are, byte for
        byte, ``files`` (by path): its series fits a release made of those files."""
        for release in sorted(self.releases.values(), key=lambda r: Version(r.version))[::-1]:
            installed = [g for g in release.groups if g.installed]
            if installed and all(
                files.get(g.path) is not None and sha256_bytes(files[g.path]) == g.base_sha256
                for g in installed
            ):
                return release
        return None

    def not_carried(self, version: str) -> str:
        """What to do with vLLM ``version``, in the series' span or newer, without a series."""
        known = sorted(self.releases, key=Version)
        return (
            f"vLLM {version} has no series (supported: {known[0]} … {known[-1]}); the release "
            "watcher carries each new release in a pull request (vllm-patches releases lists "
            f"what is new); a contributor can carry it with vllm-patches watch --vllm {version} "
            "in a clone of vllm-lmcache-mp"
        )


def load_manifest(path: Path = MANIFEST) -> Manifest:
    """Read and validate the manifest; every problem is reported at once."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        msg = f"cannot read the series manifest {path}: {exc}"
        raise PatchToolError(msg) from exc
    patches = {
        number: PatchInfo(number=number, **info) for number, info in raw.get("patch", {}).items()
    }
    groups = {
        name: Group(
            name=name,
            path=info["path"],
            base_release=info["base_release"],
            base_sha256=info.get("base_sha256", ""),
            patches=tuple(info["patches"]),
            results=tuple(info.get("results", ())),
        )
        for name, info in raw.get("group", {}).items()
    }
    issues: list[str] = []
    for group in groups.values():
        for patch in group.patches:
            match = PATCH_NAME.match(Path(patch).name)
            if not match:
                issues.append(f"group {group.name}: {patch} is not named NNNN-subject.patch")
            elif match.group(1) not in patches:
                issues.append(f"group {group.name}: {patch} has no [patch.{match.group(1)}]")
            if not (path.parent / patch).is_file():
                issues.append(f"group {group.name}: {patch} is missing")
    releases: dict[str, Release] = {}
    for version, info in raw.get("release", {}).items():
        missing = [g for g in info.get("groups", ()) if g not in groups]
        if missing:
            issues.append(f"release {version}: unknown groups {missing}")
            continue
        releases[version] = Release(
            version=version,
            groups=tuple(groups[g] for g in info.get("groups", ())),
            upstream=tuple(info.get("upstream", ())),
            wheel_only=bool(info.get("wheel_only", False)),
        )
    if issues:
        msg = f"{path} is inconsistent: " + "; ".join(issues)
        raise PatchToolError(msg)
    return Manifest(patches, groups, releases, dict(raw.get("unsupported", {})))
