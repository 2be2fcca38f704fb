"""Carry the series onto one new vLLM release and write what the pull request (or, on a
conflict, the issue) says.

A release with an sdist is carried by ``rebase`` (``git am -3``). A release that ships
wheels only cannot be rebased: where its official wheel's connector and factory equal, byte
for byte, the bases of groups the series has, the release gets those groups (and no test
patches, as 0.15.0 and 0.15.1 do); otherwise it needs a series made by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vllm_patches._fs import write_atomic
from vllm_patches.errors import PatchToolError, ReportedError
from vllm_patches.series import rebase
from vllm_patches.series.manifest import (
    CONNECTOR,
    FACTORY,
    MANIFEST,
    Manifest,
    Release,
    load_manifest,
)
from vllm_patches.series.overlay import dump_manifest
from vllm_patches.sources.releases import has_sdist, release_file

WATCHED = (CONNECTOR, FACTORY)
"""The files the series changes in an installed vLLM."""


@dataclass(frozen=True)
class Carried:
    """The outcome for one release: ``carried`` (a pull request) or not (an issue)."""

    version: str
    carried: bool
    title: str
    body: str


def same_bases(manifest: Manifest, version: str) -> Release | None:
    """A wheel-only release for ``version`` with the groups of the release whose bases its
    files equal (by sha256), or None where they equal none."""
    found = manifest.same_files({path: release_file(version, path) for path in WATCHED})
    if found is None:
        return None
    return Release(version, tuple(g for g in found.groups if g.installed), wheel_only=True)


def carry(version: str) -> Carried:
    """Carry the series onto vLLM ``version`` in this clone (``patches/``, the manifest and
    ``vllm_overlay/`` change only when it is carried whole).

    :raises PatchToolError: the series has ``version`` already.
    """
    if version in load_manifest().releases:
        msg = f"vLLM {version} already has a series; nothing to carry"
        raise PatchToolError(msg)
    if not has_sdist(version):
        return _wheel_only(version)
    try:
        result = rebase.start(version)
    except ReportedError as exc:
        body = "\n".join(
            [
                f"The release watcher could not carry the series onto vLLM {version}: {exc}.",
                "",
                "```diff",
                exc.report,
                "```",
            ]
        )
        return Carried(version, False, f"vLLM {version}: the series conflicts", body)
    lines = result.lines()
    range_diff = result.range_diff.rstrip("\n")
    body = "\n".join(
        [
            f"The release watcher carried the series onto vLLM {version} with "
            "`vllm-patches rebase`.",
            "",
            *(f"- {line}" for line in lines[:3]),
            "",
            f"git range-diff, vLLM {result.source} series -> vLLM {version} series:",
            "",
            "```text",
            range_diff,
            "```",
        ]
    )
    return Carried(version, True, f"Carry the series onto vLLM {version}", body)


def _wheel_only(version: str) -> Carried:
    manifest = load_manifest()
    release = same_bases(manifest, version)
    if release is None:
        body = (
            f"vLLM {version} ships no sdist, and its official wheel's "
            f"{' or '.join(WATCHED)} differs from every base the series has. A rebase needs "
            "an sdist: make the series for it by hand from the wheel's files."
        )
        return Carried(version, False, f"vLLM {version}: wheels only, new files", body)
    releases = dict(manifest.releases)
    releases[version] = release
    write_atomic(MANIFEST, dump_manifest(replace(manifest, releases=releases)).encode())
    names = ", ".join(g.name for g in release.groups)
    body = (
        f"vLLM {version} ships wheels only. Its official wheel's connector and factory are "
        f"byte for byte the bases of {names}: it gets those groups (no test patches, as it "
        "ships no tests)."
    )
    return Carried(version, True, f"Carry the series onto vLLM {version} (wheels only)", body)
