"""Ask vLLM's connector factory which class it returns for LMCacheMPConnector, and its log.

Run by path in a vLLM venv: ``python factory_class.py MODULE_PATH`` (``""`` for none).
Prints one line ``FACTORY {json}``: ``cls`` and ``log`` (0009's description, ``""`` without
0009), or ``error``.
"""

import json
import sys

from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

config = KVTransferConfig(
    kv_connector="LMCacheMPConnector",
    kv_role="kv_both",
    kv_connector_module_path=sys.argv[1] or None,
)
try:
    cls = KVConnectorFactory.get_connector_class(config)
except Exception as e:
    print("FACTORY " + json.dumps({"error": f"{type(e).__name__}: {e}"}))
else:
    describe = getattr(KVConnectorFactory, "_describe_connector", None)
    answer = {
        "cls": f"{cls.__module__}.{cls.__qualname__}",
        "log": describe(config, cls) if describe else "",
    }
    print("FACTORY " + json.dumps(answer))
