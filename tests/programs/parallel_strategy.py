"""Print what lmcache's own ParallelStrategy derives for one rank, as JSON.

Usage: python parallel_strategy.py WORLD_SIZE RANK TP_SIZE MLA(0|1). Each field is given by
its name where the installed lmcache has it (0.4.7 took ``use_mla``, 0.5.3 ``mla_only``; 0.5.0
added ``n_servers``); lmcache's properties then say which piece of the KV cache the rank
handles: the oracle the probe's expected geometry is checked against.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from lmcache.integration.vllm.vllm_multi_process_adapter import ParallelStrategy

if __name__ == "__main__":
    world_size, rank, tp_size, mla = (int(a) for a in sys.argv[1:5])
    values = {
        "use_mla": bool(mla),
        "mla_only": bool(mla),
        "vllm_world_size": world_size,
        "vllm_worker_id": rank,
        "tp_size": tp_size,
        "pp_size": world_size // tp_size,
        "n_servers": 1,
    }
    names = {f.name for f in dataclasses.fields(ParallelStrategy)}
    strategy = ParallelStrategy(**{k: v for k, v in values.items() if k in names})
    derived = ("kv_world_size", "kv_worker_id", "is_kv_writer")
    print(json.dumps({name: getattr(strategy, name) for name in derived}))
