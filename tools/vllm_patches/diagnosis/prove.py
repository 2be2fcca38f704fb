"""The main job: a pinned vLLM, the series applied, and the proof that it resolves."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vllm_patches.diagnosis.probe import probe, resolution_line
from vllm_patches.errors import PatchToolError
from vllm_patches.sources.releases import checkout
from vllm_patches.sources.venvs import default_lmcache, vllm_env
from vllm_patches.targets.apply import apply, status
from vllm_patches.targets.find import installed_vllm

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def prove(version: str, lmcache: str | None = None) -> Iterator[str]:
    """Check out ``version``, apply the series, install it patched, and show the resolution.

    The cached install is reverted afterwards, so it stays the pristine release.
    """
    lmcache = lmcache or default_lmcache(version)
    with tempfile.TemporaryDirectory(prefix="vllm-patches-prove-") as tmp:
        tree = checkout(version, Path(tmp) / "vllm")
        yield f"checkout: {tree} (tag v{version})"
        from vllm_patches.targets.find import resolve_target

        git_target = resolve_target(tree)
        yield f"apply: {apply(git_target).message}"
        yield f"status: {status(git_target).overall}"
    python = vllm_env(version, lmcache)
    site = installed_vllm(str(python))
    yield f"installed: vLLM {site.version} + lmcache {lmcache} in {python.parents[1]}"
    yield f"apply --python: {apply(site).message}"
    try:
        state = status(site).overall
        if state != "patched":
            msg = f"the installed vLLM {version} is {state} after vllm-patches apply"
            raise PatchToolError(msg)
        yield f"status: {state}"
        for env in ({}, {"LMCACHE_USE_UPSTREAM_MP": "1"}):
            result = probe(python, env)
            label = " ".join(f"{k}={v}" for k, v in env.items()) or "default"
            if not (result.ok and result.factory_is_cls and result.subclass):
                msg = (
                    f"vLLM {version} patched does not resolve LMCacheMPConnector to a "
                    f"KVConnectorBase_V1 subclass [{label}]: {result.error or result.factory}"
                )
                raise PatchToolError(msg)
            yield f"[{label}] LMCacheMPConnector = {result.cls}"
            yield (
                f"[{label}] KVConnectorFactory -> {result.factory} "
                f"(KVConnectorBase_V1 subclass: {result.subclass})"
            )
            yield f"[{label}] log: {_ANSI.sub('', resolution_line(result.log))}"
    finally:
        yield f"revert: {apply(site, revert=True).message}"
