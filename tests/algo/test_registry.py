"""Registries: decorator registration, duplicate and unknown names, custom functions by import path."""
from __future__ import annotations

import pytest
import torch

from megatron_vlmr1.algo import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    AlgoConfig,
    Registry,
    aggregate,
    get_kl_estimator,
    get_loss_aggregation,
    get_policy_loss,
    load_object,
)
from megatron_vlmr1.config import load_config

NOT_CALLABLE = 42


def reinforce_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, config, **kwargs):
    """A custom policy loss: plain REINFORCE, -A * logp, aggregated by the configured mode."""
    loss = aggregate(-advantages * logprobs, mask, config, kwargs.get("normalizer"))
    return loss, {"custom_metric": 1.0}


def squared_kl(logprobs, ref_logprobs):
    return (logprobs - ref_logprobs).square()


def max_aggregation(values, mask, config):
    return torch.where(mask.bool(), values, -torch.inf).max(), torch.tensor(1.0)


def test_builtins_are_registered():
    assert ADVANTAGE_ESTIMATORS.names() == ["grpo"]
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    assert LOSS_AGGREGATIONS.names() == ["seq-mean-token-mean", "seq-mean-token-sum-norm", "token-mean"]
    assert POLICY_LOSSES.names() == ["grpo"]


def test_register_decorator_and_duplicate_name():
    registry = Registry("widget")

    @registry.register("a")
    def first():
        return 1

    assert registry.get("a") is first and "a" in registry
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.register("a")(lambda: 2)
    assert registry.get("a") is first
    # The global registries refuse to have a built-in replaced as well.
    with pytest.raises(ValueError, match="policy loss 'grpo' is already registered"):
        POLICY_LOSSES.register("grpo")(reinforce_loss)
    with pytest.raises(ValueError, match="contain no ':'"):
        registry.register("pkg.mod:fn")


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; known: \['k1', 'k2', 'k3'\]"):
        get_kl_estimator("k4")
    with pytest.raises(ValueError, match=r"unknown policy loss 'ppo'; known: \['grpo'\]"):
        get_policy_loss("ppo")


def test_custom_policy_loss_by_import_path():
    cfg = AlgoConfig(loss="tests.algo.test_registry:reinforce_loss", loss_agg="token-mean", beta=0.0)
    loss_fn = get_policy_loss(cfg.loss)
    assert loss_fn is reinforce_loss
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -4.0]])
    adv = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, metrics = loss_fn(logp, logp, None, adv, mask, cfg, rollout_logprobs=None, normalizer=None)
    # token-mean of -A * logp over 3 tokens: (1 + 2 - 1) / 3
    assert float(loss) == pytest.approx(2 / 3)
    assert metrics == {"custom_metric": 1.0}


def test_custom_loss_from_yaml_and_override(tmp_path):
    path = tmp_path / "algo.yaml"
    path.write_text("group_size: 4\nbeta: 0.0\nloss_agg: token-mean\n")
    cfg = load_config(AlgoConfig, path, ["loss=tests.algo.test_registry:reinforce_loss", "epsilon_high=0.28"])
    assert cfg.group_size == 4 and cfg.epsilon_high == 0.28
    assert get_policy_loss(cfg.loss) is reinforce_loss


def test_custom_kl_and_aggregation_by_import_path():
    kl = get_kl_estimator("tests.algo.test_registry:squared_kl")
    assert kl(torch.tensor([[1.0]]), torch.tensor([[3.0]])).item() == 4.0
    cfg = AlgoConfig(loss_agg="tests.algo.test_registry:max_aggregation")
    assert get_loss_aggregation(cfg.loss_agg) is max_aggregation
    values = torch.tensor([[1.0, 9.0, 5.0]])
    assert aggregate(values, torch.tensor([[1, 0, 1]]), cfg).item() == 5.0


def test_bad_import_paths():
    with pytest.raises(ValueError, match="must look like 'package.module:function'"):
        load_object("tests.algo.test_registry")
    with pytest.raises(ValueError, match="cannot import module 'tests.algo.no_such_module'"):
        get_policy_loss("tests.algo.no_such_module:loss")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        get_policy_loss("tests.algo.test_registry:missing")
    with pytest.raises(ValueError, match="is not callable"):
        get_policy_loss("tests.algo.test_registry:NOT_CALLABLE")


def test_config_rejects_unknown_names_naming_the_key():
    with pytest.raises(ValueError, match=r"algo.kl_estimator: unknown KL estimator 'k4'; known: \['k1', 'k2', 'k3'\]"):
        AlgoConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match="algo.loss_agg: unknown loss aggregation 'mean'"):
        AlgoConfig(loss_agg="mean")
    with pytest.raises(ValueError, match="algo.advantage: unknown advantage estimator 'rloo'"):
        AlgoConfig(advantage="rloo")
    with pytest.raises(ValueError, match="algo.loss: import path .* has no attribute 'nope'"):
        AlgoConfig(loss="tests.algo.test_registry:nope")
