"""The scheduler loop's own pieces that need no vLLM (``probes/engine_loop.py``)."""

from __future__ import annotations

import sys

import pytest
from vllm_patches.probes import PROBES

sys.path.insert(0, str(PROBES))  # the probes import each other as siblings, as when run by path
import engine_loop


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([3, 4, 5], [3, 4, 5]),  # lmcache 0.4.6: one flat list
        ([[3, 4, 5]], [3, 4, 5]),  # lmcache 0.4.7 on: one list per KV cache group
        (([3, 4, 5],), [3, 4, 5]),  # vLLM's get_block_ids: a tuple of per-group lists
        ({0: [3, 4, 5]}, [3, 4, 5]),  # lmcache 0.5.6's tracker: per-group dict
        ([], []),
        (None, []),
    ],
)
def test_block_ids_of_one_group_whatever_their_nesting(given, expected):
    assert engine_loop.flat_blocks(given) == expected


def test_the_written_values_tell_tokens_and_positions_apart_and_are_never_zero():
    values = {engine_loop.token_value(t, p) for t in (1, 7, 1000) for p in range(544)}
    assert 0.0 not in values  # an unloaded (zeroed) block never passes for a loaded one
    assert engine_loop.token_value(1, 0) == 32.0  # (1 * 31 + 0 * 7) % 4093 + 1
    # Within one prompt of 544 tokens of the same id, every position holds its own value:
    # a block loaded one position off is seen.
    assert len({engine_loop.token_value(1, p) for p in range(544)}) == 544


def test_the_innermost_frame_of_a_raise_is_named():
    try:
        exec(compile("raise KeyError('x')", "/v/site-packages/lmcache/a.py", "exec"))
    except KeyError as exc:
        assert engine_loop.innermost(exc) == "lmcache/a.py:1 in <module>"


def test_the_reader_types_every_verdict_the_loop_gives():
    from typing import get_args, get_type_hints

    from vllm_patches.diagnosis.live import EngineLoop

    assert get_args(get_type_hints(EngineLoop)["verdict"]) == engine_loop.VERDICTS
