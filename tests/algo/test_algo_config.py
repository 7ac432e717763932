"""AlgoConfig validation: every bad value is a ValueError naming its key."""
from __future__ import annotations

import pytest

from megatron_vlmr1.algo import AlgoConfig
from megatron_vlmr1.config import from_dict


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"group_size": 1}, "algo.group_size must be >= 2"),
        ({"advantage_eps": -1e-4}, "algo.advantage_eps must be >= 0"),
        ({"beta": -0.1}, "algo.beta must be >= 0"),
        ({"epsilon_low": 1.0}, r"algo.epsilon_low must be in \[0, 1\)"),
        ({"epsilon_low": -0.1}, r"algo.epsilon_low must be in \[0, 1\)"),
        ({"epsilon_high": -0.1}, "algo.epsilon_high must be >= 0"),
        ({"dual_clip_c": 1.0}, "algo.dual_clip_c must be > 1"),
        ({"max_response_length": 0}, "algo.max_response_length must be >= 1"),
        ({"loss_agg": "seq-mean-token-sum-norm"}, "algo.max_response_length must be set"),
        ({"mu": 0}, "algo.mu must be >= 1"),
        ({"tis_cap": 0.0}, "algo.tis_cap must be > 0"),
        ({"dynamic_sampling_max_rounds": 0}, "algo.dynamic_sampling_max_rounds must be >= 1"),
    ],
)
def test_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        AlgoConfig(**overrides)


def test_defaults_are_vlm_r1_grpo():
    cfg = AlgoConfig()
    assert (cfg.group_size, cfg.beta, cfg.kl_estimator, cfg.epsilon_low, cfg.epsilon_high) == (8, 0.04, "k3", 0.2, 0.2)
    assert (cfg.loss_agg, cfg.advantage_scale) == ("seq-mean-token-mean", "std")
    assert cfg.dual_clip_c is None and cfg.tis_cap is None and not cfg.dynamic_sampling


def test_from_dict_types_and_literals():
    cfg = from_dict(AlgoConfig, {"epsilon_high": 0.28, "dual_clip_c": 3, "dynamic_sampling": True,
                                 "loss_agg": "token-mean", "beta": 0}, prefix="algo")
    assert cfg.dual_clip_c == 3.0 and isinstance(cfg.dual_clip_c, float) and cfg.dynamic_sampling
    with pytest.raises(ValueError, match=r"config key 'algo.advantage_scale': 'mad' is not one of \['std', 'none'\]"):
        from_dict(AlgoConfig, {"advantage_scale": "mad"}, prefix="algo")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['clip_eps'\]"):
        from_dict(AlgoConfig, {"clip_eps": 0.2}, prefix="algo")
