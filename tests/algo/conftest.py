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


@pytest.fixture(params=["kernel", "plain-torch"])
def group_advantage_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run an advantage test twice: on ``kernels.group_advantage`` as installed (csrc when built), and with it
    replaced by the plain torch formula above (what the kernels' torch fallback computes)."""
    if request.param == "plain-torch":
        monkeypatch.setattr(kernels, "group_advantage", reference_group_advantage)
    return request.param
