"""Which class a real installed vLLM resolves ``LMCacheMPConnector`` to: one ``PROBE`` line.

Run by path inside the target interpreter; it imports only vLLM (and what vLLM imports).
"""

from __future__ import annotations

import json
from typing import Any


def resolve() -> dict[str, Any]:
    """Import the connector module and ask vLLM's factory, as the engine would."""
    import vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector as module
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    cls = module.LMCacheMPConnector
    builtin = getattr(module, "LMCacheMPConnectorUpstream", None)
    factory = KVConnectorFactory.get_connector_class(
        KVTransferConfig(kv_connector="LMCacheMPConnector", kv_role="kv_both")
    )
    return {
        "ok": True,
        "cls": f"{cls.__module__}.{cls.__qualname__}",
        "builtin": cls is builtin or builtin is None,
        "factory": f"{factory.__module__}.{factory.__qualname__}",
        "factory_is_cls": factory is cls,
        "subclass": issubclass(factory, KVConnectorBase_V1),
    }


def main() -> None:
    """Print the resolution, or the import error as the engine would meet it."""
    try:
        result = resolve()
    except Exception as exc:  # the engine's failure is the answer, not a crash of the probe
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print("PROBE " + json.dumps(result))


if __name__ == "__main__":
    main()
