"""How long importing vLLM's connector module takes: two numbers of seconds on one line.

Run by path inside the target interpreter (``tools/bench_import`` in a clone). vLLM's config and
lmcache's adapter are imported first; the first number is all of it (what a process that
uses the connector pays), the second the module alone (which isolates, patched, the series).
"""

from __future__ import annotations

import importlib
import time

CONNECTOR = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector"
FIRST = (
    "vllm.config",
    "lmcache.integration.vllm.utils",
    "lmcache.integration.vllm.vllm_multi_process_adapter",
)


def main() -> None:
    """Print the seconds of the whole import and of the connector module's alone."""
    start = time.perf_counter()
    for name in FIRST:
        importlib.import_module(name)
    module_start = time.perf_counter()
    importlib.import_module(CONNECTOR)
    end = time.perf_counter()
    print(end - start, end - module_start)


if __name__ == "__main__":
    main()
