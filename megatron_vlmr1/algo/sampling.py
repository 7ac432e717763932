"""Dynamic sampling (DAPO): keep only the groups whose rewards differ.

A group whose G rewards are all equal (all correct or all wrong) has all-zero group-relative advantages, so it
adds no gradient, only dilutes the batch (and, with a per-sequence mean, shrinks the effective learning rate).
DAPO drops such groups and samples more prompts until the batch is full; the trainer owns that loop, these
helpers say which groups to keep.
"""
from __future__ import annotations

import torch

from megatron_vlmr1.algo.advantages import check_groups


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Indices of the groups whose rewards are not all equal (non-zero variance).

    rewards: [num_prompts * G], groups contiguous. Returns int64 [K] ascending, K <= num_prompts.
    Equality is exact: rewards are rule-based scores, and two completions that earn the same score should
    compare equal; a group differing only by round-off would still get (tiny) non-zero advantages.
    """
    check_groups(rewards, group_size)
    grouped = rewards.view(-1, group_size)
    varies = (grouped != grouped[:, :1]).any(dim=1)
    return varies.nonzero().flatten()


def group_sample_indices(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """The sample indices covered by group indices: group g -> g*G, ..., g*G + G - 1.

    groups: int64 [K]. Returns int64 [K * G], groups kept contiguous (ready to index rewards or sequences).
    """
    offsets = torch.arange(group_size, device=groups.device)
    return (groups[:, None] * group_size + offsets).flatten()
