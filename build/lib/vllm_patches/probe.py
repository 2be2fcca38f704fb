"""Ask a real installed vLLM which class ``LMCacheMPConnector`` resolves to."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vllm_patches._proc import run_subprocess

_PROBE = r"""
import json, sys
result = {}
try:
    import vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector as m
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
    cls = m.LMCacheMPConnector
    builtin = getattr(m, "LMCacheMPConnectorUpstream", None)
    factory = KVConnectorFactory.get_connector_class(
        KVTransferConfig(kv_connector="LMCacheMPConnector", kv_role="kv_both"))
    result = {
        "ok": True,
        "cls": f"{cls.__module__}.{cls.__qualname__}",
        "builtin": cls is builtin or builtin is None,
        "factory": f"{factory.__module__}.{factory.__qualname__}",
        "factory_is_cls": factory is cls,
        "subclass": issubclass(factory, KVConnectorBase_V1),
    }
except Exception as e:
    result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
print("PROBE " + json.dumps(result))
"""


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
    proc = run_subprocess([python, "-c", _PROBE], env=full_env, what="importing the connector")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("PROBE "))
    data = json.loads(line[len("PROBE ") :])
    return Resolution(**data, log=proc.stderr + proc.stdout)


def resolution_line(log: str) -> str:
    """The resolution's one log line, without colours."""
    for line in log.splitlines():
        if "LMCacheMPConnector: " in line or "LMCacheMPConnector from" in line:
            return line
    return ""
