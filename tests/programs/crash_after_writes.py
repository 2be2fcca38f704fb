"""Run apply-patches and die (``os._exit``) right after its Nth file write: a crash there.

Usage: python crash_after_writes.py N ARGS...; N = 0 never crashes and prints the count.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from vllm_patches import _journal
from vllm_patches.__main__ import apply_main

CRASH_CODE = 70
_real = _journal.write_atomic
_count = 0


def _crashing(path: Path, data: bytes | None) -> None:
    global _count  # noqa: PLW0603
    _real(path, data)
    _count += 1
    if _count == int(sys.argv[1]):
        os._exit(CRASH_CODE)


if __name__ == "__main__":
    _journal.write_atomic = _crashing
    code = apply_main(sys.argv[2:])
    print(f"WRITES {_count}")
    sys.exit(code)
