"""The vLLM x lmcache pairing table, in the order its data flows.

- :mod:`.measure`: every cell built for real (``run_matrix``), shards and ``merge``;
- :mod:`.pins`: the dependencies a vLLM and an lmcache release pin apart;
- :mod:`.verdicts`: reading a table (a cell side's ``verdict``, ``counts``, ``pairs``);
- :mod:`.render`: ``matrix.md``, ``matrix.json`` and the README's summary.
"""

from vllm_patches.diagnosis.matrix.measure import (
    FIRST_LMCACHE,
    axes,
    load_results,
    merge,
    run_matrix,
    shard_of,
)
from vllm_patches.diagnosis.matrix.pins import pin_conflicts
from vllm_patches.diagnosis.matrix.render import (
    markdown,
    pairs_lines,
    summary,
    update_readme,
    write,
)
from vllm_patches.diagnosis.matrix.verdicts import (
    any_works,
    counts,
    cpu_round_trips,
    disagreements,
    pairs,
    serving_steps,
    shipped,
    starts_with,
    verdict,
)

__all__ = [
    "FIRST_LMCACHE",
    "any_works",
    "axes",
    "counts",
    "cpu_round_trips",
    "disagreements",
    "load_results",
    "markdown",
    "merge",
    "pairs",
    "pairs_lines",
    "pin_conflicts",
    "run_matrix",
    "serving_steps",
    "shard_of",
    "shipped",
    "starts_with",
    "summary",
    "update_readme",
    "verdict",
    "write",
]
