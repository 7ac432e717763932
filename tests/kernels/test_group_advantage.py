"""group_advantage against hand values and the torch reference."""
import math

import pytest
import torch

from megatron_vlmr1.kernels import group_advantage
from megatron_vlmr1.kernels.reference import group_advantage_reference


def test_hand_computed_std():
    adv = group_advantage(torch.tensor([1.0, 0.0, 1.0, 2.0, 4.0, 6.0]), group_size=3, eps=0.0)
    # group 1: mean 2/3, unbiased std sqrt(1/3); group 2: mean 4, unbiased std 2
    s = math.sqrt(1 / 3)
    want = torch.tensor([(1 / 3) / s, (-2 / 3) / s, (1 / 3) / s, -1.0, 0.0, 1.0])
    torch.testing.assert_close(adv, want, atol=1e-6, rtol=0)


def test_hand_computed_none_only_centres():
    adv = group_advantage(torch.tensor([1.0, 0.0, 1.0, 2.0, 4.0, 6.0]), group_size=3, scale="none")
    torch.testing.assert_close(adv, torch.tensor([1 / 3, -2 / 3, 1 / 3, -2.0, 0.0, 2.0]), atol=1e-6, rtol=0)


def test_zero_variance_group_gets_zero_advantage():
    adv = group_advantage(torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 0.0, 1.0]), group_size=4)
    assert torch.equal(adv[:4], torch.zeros(4))
    torch.testing.assert_close(adv[4:], group_advantage_reference(torch.tensor([0.0, 1.0, 0.0, 1.0]), 4))


@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("group_size", [2, 8, 16])
def test_matches_reference(scale, group_size):
    gen = torch.Generator().manual_seed(group_size)
    rewards = torch.rand(12 * group_size, generator=gen) * 3
    rewards[:group_size] = 1.0  # one zero-variance group
    adv = group_advantage(rewards, group_size, scale=scale, eps=1e-4)
    assert adv.dtype == torch.float32 and adv.shape == rewards.shape
    torch.testing.assert_close(adv, group_advantage_reference(rewards, group_size, scale=scale, eps=1e-4),
                               atol=1e-6, rtol=1e-6)


def test_integer_and_double_rewards_are_accepted():
    rewards = torch.tensor([1, 0, 0, 1])
    torch.testing.assert_close(group_advantage(rewards, 2), group_advantage(rewards.double(), 2))


@pytest.mark.parametrize("rewards,group_size,scale,message", [
    (torch.zeros(6), 1, "std", "group_size must be >= 2"),
    (torch.zeros(7), 2, "std", "not a whole number of groups"),
    (torch.zeros(6), 2, "mad", "scale must be one of"),
    (torch.zeros(2, 3), 3, "std", "1-D"),
])
def test_user_errors(rewards, group_size, scale, message):
    with pytest.raises(ValueError, match=message):
        group_advantage(rewards, group_size, scale=scale)
