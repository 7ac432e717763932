"""Shared fixtures for the algo tests."""
from __future__ import annotations

import pytest
import torch

from megatron_vlmr1 import kernels


def reference_group_advantage(
    rewards: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-4
) -> torch.Tensor:
    """Plain torch group advantage: (r - mean) / (std_unbiased + eps) per contiguous group. [N] -> [N]."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "std":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


@pytest.fixture
def group_advantage_kernel(monkeypatch: pytest.MonkeyPatch) -> str:
    """Make sure ``kernels.group_advantage`` exists: the kernels package's own op once it lands, until then the
    reference above. Returns which one the test ran against."""
    if hasattr(kernels, "group_advantage"):
        return "kernels"
    monkeypatch.setattr(kernels, "group_advantage", reference_group_advantage, raising=False)
    return "test-reference"
