"""GRPO group-relative advantage, on the csrc kernel (torch fallback per `extension.use_csrc`)."""
from __future__ import annotations

import torch

from megatron_vlmr1.kernels import reference
from megatron_vlmr1.kernels.extension import use_csrc

SCALES = ("std", "none")


def group_advantage(rewards: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-4) -> torch.Tensor:
    """Rewards `[num_prompts * G]`, each prompt's G completions contiguous → advantages `[num_prompts * G]` fp32.

    scale="std": (r - mean) / (std + eps) with the unbiased std, as VLM-R1 and TRL compute it (a group whose
    rewards are all equal gets 0). scale="none": r - mean only (Dr.GRPO, which drops the std normalisation).
    """
    if scale not in SCALES:
        raise ValueError(f"group_advantage: scale must be one of {SCALES}, got {scale!r}")
    if rewards.dim() != 1:
        raise ValueError(f"group_advantage: rewards must be 1-D [num_prompts * G], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_advantage: group_size must be >= 2 (the std of one sample is undefined), "
                         f"got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"group_advantage: {rewards.numel()} rewards are not a whole number of groups of "
                         f"{group_size}")
    rewards = rewards.float().contiguous()
    if use_csrc(rewards.device):
        return torch.ops.vlmr1.group_advantage(rewards, group_size, scale == "std", eps)
    return reference.group_advantage_reference(rewards, group_size, scale, eps)
