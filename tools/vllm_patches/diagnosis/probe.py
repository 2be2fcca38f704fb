"""Ask a real installed vLLM which class ``LMCacheMPConnector`` resolves to."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vllm_patches._proc import run_subprocess
from vllm_patches.probes import PROBES

PROBE = PROBES / "resolution.py"


@dataclass(frozen=True)
class Resolution:
    """What a real vLLM said."""

    ok: bool
    cls: str = ""
    """``module.QualName`` of ``LMCacheMPConnector``."""
    builtin: bool = False
    factory: str = ""
    factory_is_cls: bool = False
    subclass: bool = False
    error: str = ""
    log: str = ""
    """Everything the import printed (the resolution's log line is in it)."""


def probe(
    python: Path, env: Mapping[str, str] | None = None, pythonpath: list[Path] | None = None
) -> Resolution:
    """Import the connector module in ``python`` and report the resolution.

    :param env: extra environment (``LMCACHE_USE_UPSTREAM_MP`` …).
    :param pythonpath: directories put first on ``sys.path`` (fake modules).
    """
    full_env = {"LMCACHE_LOG_LEVEL": "INFO", **(env or {})}
    if pythonpath:
        full_env["PYTHONPATH"] = ":".join(str(p) for p in pythonpath)
    proc = run_subprocess([python, PROBE], env=full_env, what="importing the connector")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("PROBE "))
    data = json.loads(line[len("PROBE ") :])
    return Resolution(**data, log=proc.stderr + proc.stdout)


RESOLUTION_LOGS = ("LMCacheMPConnector is ", "LMCacheMPConnector from", "Upstream in vLLM")
"""What the resolution's log line holds: the series' (0004), or one of vLLM 0.22.0's."""


def resolution_line(log: str) -> str:
    """The resolution's one log line."""
    for line in log.splitlines():
        if any(text in line for text in RESOLUTION_LOGS):
            return line
    return ""
