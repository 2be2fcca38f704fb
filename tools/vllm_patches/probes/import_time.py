"""How long importing vLLM's connector module alone takes: one number of seconds.

Run by path inside the target interpreter (``tools/bench_import`` in a clone). vLLM's config and
lmcache's adapter are imported first, so that the figure isolates the module itself and,
patched, the series' resolution.
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
    """Print the seconds the connector module's import took."""
    for name in FIRST:
        importlib.import_module(name)
    start = time.perf_counter()
    importlib.import_module(CONNECTOR)
    print(time.perf_counter() - start)


if __name__ == "__main__":
    main()
