"""tools/bench_grpo.py: the FLOPs bookkeeping (the timing itself is a benchmark, not a test)."""
from __future__ import annotations

import pytest
import torch

from megatron_vlmr1.trainer.packing import PAD_SEGMENT, PROMPT_SEGMENT, pack_group
from tools.bench_grpo import attended_keys, parse_args


def test_attended_keys_hand_computed():
    # prompt of 3, completions of 2 and 1: per-row rows of 5 and 4 tokens attend 15 + 10 keys
    assert attended_keys(3, [2, 1], shared=False) == 25
    # packed [p0 p1 | p2 c1 c2 | p2 c'1]: 1 + 2 + (3 + 4 + 5) + (3 + 4)
    assert attended_keys(3, [2, 1], shared=True) == 22


def test_attended_keys_matches_the_packed_attention():
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 0], [5, 6, 7, 8, 11, 0, 0]])
    packed = pack_group(input_ids, torch.zeros(3, 2, 7, dtype=torch.long), prompt_length=4, completion_lengths=[3, 1])
    segments = packed.segments
    query, key = segments[:, None], segments[None, :]
    causal = torch.ones(len(segments), len(segments), dtype=torch.bool).tril()
    allowed = causal & (key != PAD_SEGMENT) & ((key == PROMPT_SEGMENT) | (key == query))
    assert int(allowed.sum()) == attended_keys(4, [3, 1], shared=True)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="group-size"):
        parse_args(["--group-size", "1"])
    with pytest.raises(SystemExit):
        parse_args(["--shape", "13b"])
