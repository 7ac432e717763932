"""Advantage estimators: one scalar per completion, from the rewards of its group.

Rewards arrive as ``[num_prompts * G]`` with each prompt's G completions contiguous (the order the rollout
produces). Every estimator has the signature ``(rewards [N], config) -> advantages [N]``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_vlmr1 import kernels
from megatron_vlmr1.algo.registry import ADVANTAGE_ESTIMATORS

if TYPE_CHECKING:
    from megatron_vlmr1.algo.config import AlgoConfig


def check_groups(rewards: torch.Tensor, group_size: int) -> None:
    """Raise a ``ValueError`` unless ``rewards`` [N] splits into whole groups of ``group_size >= 2``."""
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 (got {group_size}): a group-relative advantage needs at least two "
            "completions per prompt"
        )
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_prompts * group_size], got shape {tuple(rewards.shape)}")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(rewards: torch.Tensor, config: AlgoConfig) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean(r_group)) / (std(r_group) + eps), std unbiased as in TRL and VLM-R1.

    ``config.advantage_scale == "none"`` keeps only the mean subtraction (Dr.GRPO: dividing by the std
    up-weights groups that are nearly all right or all wrong, a difficulty bias).

    A group whose rewards are all equal gets exactly zero: its mean can differ from the rewards by round-off,
    which divided by ``eps`` alone would otherwise leave advantages of order 1e-4 instead of 0.

    rewards: [N] float, N = num_prompts * G, groups contiguous. Returns [N] float32.
    """
    check_groups(rewards, config.group_size)
    rewards = rewards.float()
    advantages = kernels.group_advantage(
        rewards, config.group_size, scale=config.advantage_scale, eps=config.advantage_eps
    )
    grouped = rewards.view(-1, config.group_size)
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return advantages.view(-1, config.group_size).masked_fill(constant, 0.0).view(-1)


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level advantages to per-token ones: every response token of sequence i gets A_i, padding 0.

    advantages: [B]; mask: [B, T] (1 on response tokens). Returns [B, T] in the advantages' dtype.
    """
    if advantages.dim() != 1 or mask.dim() != 2 or advantages.shape[0] != mask.shape[0]:
        raise ValueError(
            f"expected advantages [B] and mask [B, T], got {tuple(advantages.shape)} and {tuple(mask.shape)}"
        )
    return advantages[:, None] * mask.to(advantages.dtype)
