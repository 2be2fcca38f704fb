"""A pytest plugin for vLLM's own tests where vLLM runs its unspecified platform.

vLLM 0.34.0 and later are built ``+empty`` here (their CPU platform needs triton-cpu, which
no package index serves), so vLLM's global clean-up after each test is not the CPU
platform's: it asks torch's accelerator to empty its cache, and torch's CPU build, which has
no accelerator, refuses ("Cannot access accelerator device when none is available"), failing
every test at teardown. vLLM's own marker ``skip_global_cleanup`` turns that clean-up off; it
is given to every test where torch has no accelerator. Nothing else is changed.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test skips vLLM's global clean-up where torch has no accelerator."""
    if torch.accelerator.is_available():
        return
    for item in items:
        item.add_marker(pytest.mark.skip_global_cleanup)
