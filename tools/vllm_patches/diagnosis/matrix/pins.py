"""Which dependencies a vLLM release and an lmcache release pin apart (from their own metadata)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from vllm_patches.sources.releases import (
    final_releases,
    has_sdist,
    read_sdist_file,
    wheel_requirements,
)


def _requirements(lines: Iterable[str]) -> list[Requirement]:
    """The requirements in ``lines`` (a requirements file or Requires-Dist) that apply here."""
    found = []
    for line in lines:
        text = line.split(" #", 1)[0].strip()
        if not text or text.startswith(("#", "-")):
            continue
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            found.append(req)
    return found


@functools.cache
def _vllm_requirements(version: str) -> tuple[Requirement, ...]:
    """What vLLM ``version`` requires on every platform (its ``requirements/common.txt``; for
    a release that ships wheels only, what its official wheel requires)."""
    if not has_sdist(version):
        return tuple(_requirements(wheel_requirements(version)))
    data = read_sdist_file(version, "requirements/common.txt") or b""
    return tuple(_requirements(data.decode().splitlines()))


def pin_conflicts(version: str, layer: Path) -> list[str]:
    """The dependencies that vLLM ``version`` and the lmcache in ``layer`` pin apart.

    A conflict is a package both require for which no final release on the index satisfies
    both: ``pip install vllm==V lmcache==L`` is then refused, and installing lmcache after
    vLLM moves that package out of vLLM's range.
    """
    dist = next(iter(metadata.distributions(path=[str(layer)])))
    mine = {canonicalize_name(r.name): r for r in _vllm_requirements(version)}
    found = []
    for req in _requirements(dist.requires or []):
        theirs = mine.get(canonicalize_name(req.name))
        if theirs is None:
            continue
        both = theirs.specifier & req.specifier
        if not any(both.contains(v) for v in _releases(req.name)):
            found.append(f"{req.name}: vLLM {theirs.specifier}, lmcache {req.specifier}")
    return found


@functools.cache
def _releases(project: str) -> list[str]:
    return final_releases(project, "0")
