"""Programs run by path inside a target interpreter.

They import only vLLM, lmcache and the standard library.
"""

from pathlib import Path

PROBES = Path(__file__).parent
"""This directory: ``PROBES / "connector_build.py"`` is what a target interpreter runs."""
