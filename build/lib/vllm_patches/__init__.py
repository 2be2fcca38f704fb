"""Carry the LMCacheMPConnector patch series onto pinned vLLM releases."""

from __future__ import annotations

from vllm_patches.errors import PatchToolError

__all__ = ["PatchToolError"]


def __dir__() -> list[str]:
    return __all__
