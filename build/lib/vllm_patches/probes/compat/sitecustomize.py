"""Loaded by every process the connector probe starts (it is first on their PYTHONPATH).

vLLM 0.17.x's CPU platform calls ``torch._C._cpu._is_avx512_supported()`` while it inspects a
model's architecture (in a subprocess of its own); torch 2.13, the CPU build this machine has,
keeps that function as ``torch.cpu._is_avx512_supported`` only. Without the old name no
``ModelConfig`` can be built there, which says nothing about the connector. Only that missing
alias is added; nothing of vLLM, lmcache or the connector is touched.
"""

import importlib.util

if importlib.util.find_spec("torch") is not None:
    import torch

    if not hasattr(torch._C._cpu, "_is_avx512_supported"):
        torch._C._cpu._is_avx512_supported = torch.cpu._is_avx512_supported
