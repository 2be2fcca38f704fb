"""The overlay: the files the series produces, regenerated from ``patches/``, never edited."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from vllm_patches.errors import PatchToolError
from vllm_patches.series import patchfile
from vllm_patches.series.manifest import (
    MANIFEST,
    OVERLAY_DIR,
    PATCHES_DIR,
    Group,
    Manifest,
    file_sha256,
    load_manifest,
    sha256_bytes,
)
from vllm_patches.sources.releases import read_sdist_file


def apply_to_bytes(
    path: str, base: bytes | None, patches: list[Path], *, reverse: bool = False
) -> list[bytes | None]:
    """Apply ``patches`` one by one to ``base`` (``None``: no file), exactly, without git.

    :param reverse: take each patch off instead, in the order given.
    :returns: the file's bytes after each patch (``None`` where the file is gone).
    :raises PatchToolError: a patch does not apply exactly.
    """
    results: list[bytes | None] = []
    data = base
    for patch in patches:
        data = patchfile.apply(patch, path, data, reverse=reverse)
        results.append(data)
    return results


def group_results(group: Group) -> tuple[bytes | None, list[bytes | None]]:
    """The group's base bytes (from its base release's sdist) and the bytes after each patch."""
    base = read_sdist_file(group.base_release, group.path)
    if file_sha256(base) != group.base_sha256:
        msg = (
            f"group {group.name}: {group.path} in vLLM {group.base_release} does not have "
            f"the recorded sha256 {group.base_sha256 or '(absent)'}; fix patches/series.toml"
        )
        raise PatchToolError(msg)
    return base, apply_to_bytes(group.path, base, [PATCHES_DIR / p for p in group.patches])


def regenerate(manifest: Manifest | None = None, *, check: bool = False) -> list[str]:
    """Rebuild ``vllm_overlay/`` and the result hashes of the manifest from the series.

    :param check: compare only; change nothing.
    :returns: the differences found (with ``check``) or the files written.
    """
    manifest = manifest or load_manifest()
    report: list[str] = []
    groups: dict[str, Group] = {}
    wanted: dict[Path, bytes] = {}
    for group in manifest.groups.values():
        _, results = group_results(group)
        groups[group.name] = replace(group, results=tuple(sha256_bytes(r) for r in results))
        if group.installed:
            wanted[group.overlay_file] = results[-1]
    present = {p for p in OVERLAY_DIR.rglob("*") if p.is_file()} if OVERLAY_DIR.is_dir() else set()
    for path, data in sorted(wanted.items()):
        rel = path.relative_to(OVERLAY_DIR.parent)
        if not path.is_file() or path.read_bytes() != data:
            report.append(f"{rel} differs from its base + series")
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    for path in sorted(present - set(wanted)):
        report.append(f"{path.relative_to(OVERLAY_DIR.parent)} belongs to no group")
        if not check:
            path.unlink()
    new_manifest = replace(manifest, groups=groups)
    text = dump_manifest(new_manifest)
    if MANIFEST.read_text() != text:
        report.append(f"{MANIFEST.relative_to(MANIFEST.parents[1])} result hashes are stale")
        if not check:
            MANIFEST.write_text(text)
    return report


def _toml_list(items: tuple[str, ...] | list[str]) -> str:
    if not items:
        return "[]"
    return "[\n" + "".join(f'    "{item}",\n' for item in items) + "]"


def dump_manifest(manifest: Manifest) -> str:
    """Serialise the manifest in its one canonical layout."""
    out = [
        "# The patch series: which patches each supported vLLM release gets.",
        "# A group is the chain of patches made against one distinct base of one file;",
        "# its result hashes are written by `vllm-patches overlay` (in a clone).",
        "",
    ]
    for info in manifest.patches.values():
        out += [f'[patch."{info.number}"]', f'title = "{info.title}"']
        if info.upstream:
            out.append(f'upstream = "{info.upstream}"')
        if info.first_release:
            out.append(f'first_release = "{info.first_release}"')
        if info.only_before:
            out.append(f'only_before = "{info.only_before}"')
        out.append("")
    for group in manifest.groups.values():
        out += [
            f'[group."{group.name}"]',
            f'path = "{group.path}"',
            f'base_release = "{group.base_release}"',
            f'base_sha256 = "{group.base_sha256}"',
            f"patches = {_toml_list(group.patches)}",
            f"results = {_toml_list(group.results)}",
            "",
        ]
    for release in manifest.releases.values():
        out += [
            f'[release."{release.version}"]',
            f"groups = {_toml_list([g.name for g in release.groups])}",
        ]
        if release.upstream:
            out.append(f"upstream = {_toml_list(release.upstream)}")
        if release.wheel_only:
            out.append("wheel_only = true")
        out.append("")
    if manifest.unsupported:
        out.append("[unsupported]")
        out += [f'"{v}" = "{why}"' for v, why in manifest.unsupported.items()]
        out.append("")
    return "\n".join(out)
