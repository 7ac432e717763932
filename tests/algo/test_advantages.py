"""GRPO advantages against hand-computed values; broadcast to tokens; dynamic-sampling group selection."""
from __future__ import annotations

import types

import pytest
import torch

from megatron_vlmr1.algo import (
    AlgoConfig,
    broadcast_to_tokens,
    get_advantage_estimator,
    group_sample_indices,
    informative_groups,
)
from tests.algo.conftest import reference_group_advantage

pytestmark = pytest.mark.usefixtures("group_advantage_kernel")


def grpo(rewards: list[float], group_size: int, **kwargs) -> torch.Tensor:
    cfg = AlgoConfig(group_size=group_size, **kwargs)
    return get_advantage_estimator(cfg.advantage)(torch.tensor(rewards), cfg)


def test_grpo_std_scale_hand_values():
    # Group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.5773503,
    # A = +-0.5 / (0.5773503 + 1e-4) = +-0.8658754.
    # Group [3, 1, 2, 2]: mean 2, unbiased std sqrt((1 + 1 + 0 + 0) / 3) = 0.8164966,
    # A = [1, -1, 0, 0] / 0.8165966 = [1.2245949, -1.2245949, 0, 0].
    adv = grpo([1, 0, 0, 1, 3, 1, 2, 2], group_size=4)
    expected = torch.tensor([0.8658754, -0.8658754, -0.8658754, 0.8658754, 1.2245949, -1.2245949, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)


def test_grpo_group_of_two_and_eps():
    # [1, 0]: mean 0.5, unbiased std sqrt(0.5) = 0.7071068; A = +-0.5 / 0.7072068 = +-0.7070068.
    torch.testing.assert_close(grpo([1, 0], group_size=2), torch.tensor([0.7070068, -0.7070068]), rtol=0, atol=1e-6)
    # eps = 0 gives the exact z-score: [3, 1, 2] has mean 2 and unbiased std 1.
    torch.testing.assert_close(
        grpo([3, 1, 2], group_size=3, advantage_eps=0.0), torch.tensor([1.0, -1.0, 0.0]), rtol=0, atol=1e-7
    )


def test_grpo_scale_none_only_centres():
    # Dr.GRPO: no division by the std.
    adv = grpo([1, 0, 0, 1, 3, 1, 2, 2], group_size=4, advantage_scale="none")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0, 0.0]), rtol=0, atol=0)


@pytest.mark.parametrize("scale", ["std", "none"])
def test_all_equal_rewards_give_exact_zeros(scale):
    # 0.46843177 (a float32) repeated 3 times: the float32 group mean misses it by one ulp, so a plain
    # (r - mean) / (std + eps) gives -0.000298 for every member instead of 0.
    awkward = [0.4684317708015442] * 3
    assert (reference_group_advantage(torch.tensor(awkward), 3) != 0).all()
    rewards = awkward + [0.1] * 3 + [1 / 3] * 3 + [0.0, 1.0, 0.0]
    adv = grpo(rewards, group_size=3, advantage_scale=scale)
    assert torch.equal(adv[:9], torch.zeros(9))
    assert (adv[9:] != 0).all()


def test_grpo_matches_reference_on_random_rewards():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.rand(12 * 6, generator=generator).round(decimals=1)
    cfg = AlgoConfig(group_size=6)
    adv = get_advantage_estimator("grpo")(rewards, cfg)
    torch.testing.assert_close(adv, reference_group_advantage(rewards, 6), rtol=1e-5, atol=1e-6)
    # Within a group, advantages sum to zero (up to round-off).
    torch.testing.assert_close(adv.view(12, 6).sum(dim=1), torch.zeros(12), rtol=0, atol=1e-5)


def test_group_size_one_is_rejected():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        AlgoConfig(group_size=1)
    # The estimator checks too, for callers that build the config some other way.
    fake_config = types.SimpleNamespace(group_size=1, advantage_scale="std", advantage_eps=1e-4)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        get_advantage_estimator("grpo")(torch.tensor([1.0, 0.0]), fake_config)


def test_rewards_not_divisible_by_group_size():
    with pytest.raises(ValueError, match="5 rewards do not split into groups of 2"):
        grpo([1, 0, 1, 0, 1], group_size=2)
    with pytest.raises(ValueError, match="1-D"):
        get_advantage_estimator("grpo")(torch.zeros(2, 2), AlgoConfig(group_size=2))


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    out = broadcast_to_tokens(torch.tensor([0.5, -1.0, 2.0]), mask)
    assert torch.equal(out, torch.tensor([[0.5, 0.5, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="advantages \\[B\\] and mask \\[B, T\\]"):
        broadcast_to_tokens(torch.zeros(2), mask)


def test_informative_groups_and_sample_indices():
    # G = 2: groups (1, 1) and (0, 0) are all-equal; (0, 1) and (0.5, 1) vary.
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 1.0])
    groups = informative_groups(rewards, group_size=2)
    assert groups.tolist() == [1, 3]
    assert group_sample_indices(groups, group_size=2).tolist() == [2, 3, 6, 7]
    # The kept groups are exactly those with non-zero advantages.
    adv = grpo(rewards.tolist(), group_size=2)
    assert (adv.view(4, 2) != 0).any(dim=1).nonzero().flatten().tolist() == [1, 3]


def test_informative_groups_none_and_errors():
    assert informative_groups(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), group_size=3).tolist() == []
    assert group_sample_indices(torch.tensor([], dtype=torch.long), group_size=3).tolist() == []
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        informative_groups(torch.tensor([1.0, 0.0]), group_size=1)
