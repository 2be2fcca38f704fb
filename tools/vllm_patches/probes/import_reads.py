"""What importing a module does besides importing: one ``READS {json}`` line.

Run by path inside the target interpreter: ``PY import_reads.py [MODULE]`` (vLLM's connector
module by default). The standard library's source readers and package walkers are wrapped,
and a call made directly from the module's own code is recorded by name; calls made by the
modules it imports are theirs, and the import system's own directory scans do not go through
these names. ``[]`` means the module read no source and walked no package while it imported.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import pkgutil
import sys
from collections.abc import Callable
from typing import Any

CONNECTOR = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector"
WATCHED = (
    (inspect, ("getsource", "getsourcelines", "findsource", "getsourcefile")),
    (ast, ("parse",)),
    (pkgutil, ("iter_modules", "walk_packages")),
    (os, ("listdir", "scandir", "walk")),
)


def _recorder(
    original: Callable[..., Any], name: str, source: str, calls: list[str]
) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if sys._getframe(1).f_code.co_filename.endswith(source):
            calls.append(name)
        return original(*args, **kwargs)

    return wrapper


def main(module: str) -> None:
    """Import ``module`` with the readers wrapped; print what its own code called."""
    calls: list[str] = []
    source = os.sep + module.replace(".", os.sep) + ".py"
    for owner, names in WATCHED:
        for name in names:
            wrapped = _recorder(getattr(owner, name), f"{owner.__name__}.{name}", source, calls)
            setattr(owner, name, wrapped)
    importlib.import_module(module)
    print("READS " + json.dumps(calls))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else CONNECTOR)
