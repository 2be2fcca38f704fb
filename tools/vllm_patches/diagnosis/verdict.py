"""The one vocabulary of verdicts.

A verdict is computed once, by the probe that measured it (``probes/serving.verdict`` for a
built candidate, ``probes/engine_loop.VERDICTS`` for vLLM's scheduler loop), and stored as it
was measured; ``doctor``, ``doctor --live``, ``pairs`` and the pairing table only read it and
say it in the words below.
"""

from __future__ import annotations

from typing import Literal

LoopVerdict = Literal["serves", "raises", "hangs", "wrong blocks", "leaks", "unverified"]
"""What vLLM's scheduler loop ended in (``probes/engine_loop.VERDICTS``)."""

Verdict = Literal[
    "serves", "works", "fails", "hangs", "wrong geometry", "wrong blocks", "leaks", "unverified"
]
"""A built candidate's verdict: ``serves`` where vLLM's scheduler loop ran clean, ``works``
where only the one engine step could run (the release's test helpers were not at hand)."""

TableVerdict = Literal[
    "works",
    "fails",
    "hangs",
    "wrong geometry",
    "wrong blocks",
    "leaks",
    "clear error",
    "does not import",
    "not built",
]
"""One side of a pairing-table cell: a candidate's verdict as the table shows it, or why no
candidate was built (``clear error``: the series' refusal; ``does not import``: vLLM's
connector module; ``not built``: no server of that lmcache release runs here)."""

SERVING: tuple[Verdict, ...] = ("serves", "works")
"""Verdicts of a class an engine can serve with."""

SILENT: tuple[Verdict, ...] = ("hangs", "wrong geometry", "wrong blocks", "leaks")
"""Verdicts of a class that constructs, so that nothing static sees them, yet would not serve."""

ENGINE_MEETS: dict[str, str] = {
    "fails": "the engine would fail on its first requests",
    "raises": "the engine would fail on its first requests",
    "hangs": "the engine would hang on its first requests",
    "wrong geometry": "a tensor-parallel worker would read and write the wrong KV pieces",
    "wrong blocks": "the engine would move KV to or from blocks the scheduler did not give",
    "leaks": "the engine would leave KV blocks held after its requests finish",
    "unverified": "not verified: a step of vLLM's scheduler loop cannot run on a CPU",
}
"""What an engine meets, by verdict: the one sentence doctor, doctor --live and the table
give it."""
