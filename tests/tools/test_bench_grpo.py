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


def test_summarize_reports_the_workload_and_medians():
    from tools.bench_grpo import format_table, summarize

    args = parse_args(["--group-size", "2", "--prompts", "2", "--beta", "0"])
    steps = []
    for step_time, prompt in ((3.0, 100.0), (5.0, 120.0), (4.0, 110.0)):
        metrics = {"time/step": step_time, "time/rollout": 1.0, "time/update": step_time - 1.0}
        steps.append({"metrics": metrics, "flops": {"train": 2e12, "rollout": 1e12}, "row_tokens": 1000,
                      "generated": 256, "prompt_tokens": prompt})
    row = summarize({"engine": "vllm", "shared_prefix": True}, steps, args, devices=1)
    assert row["prompt_len"] == 110.0 and row["completion_len"] == 64.0  # 256 tokens over 2 prompts x G=2
    assert row["s_per_step"] == 4.0 and row["train_fwd"] == 3.0 and row["rollout"] == 1.0
    assert row["train_tok_s"] == 1000 / 3.0 and row["tflops_per_step"] == 3.0
    assert format_table([row]).splitlines()[0].startswith("engine | shared_prefix | prompt_len | completion_len")
