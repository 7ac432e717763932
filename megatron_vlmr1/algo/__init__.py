"""The RL math, pure tensor-in/tensor-out: advantages, KL estimators, policy losses, loss aggregation.

Nothing here knows about processes, models or megatron. Importing the package registers the built-ins; the
trainer always goes through the registries:

    adv = get_advantage_estimator(cfg.advantage)(rewards, cfg)                  # [P*G]
    adv_tok = broadcast_to_tokens(adv, mask)                                    # [B, T]
    norm = loss_normalizer(full_batch_mask, cfg)                                # once per batch
    loss, metrics = get_policy_loss(cfg.loss)(logp, old_logp, ref_logp, adv_tok, mask, cfg,
                                              rollout_logprobs=rollout_logp, normalizer=norm)
"""
from typing import Any, Callable

from megatron_vlmr1.algo.advantages import broadcast_to_tokens, check_groups, grpo_advantages
from megatron_vlmr1.algo.aggregation import aggregate, loss_normalizer
from megatron_vlmr1.algo.config import AlgoConfig
from megatron_vlmr1.algo.kl import kl_k1, kl_k2, kl_k3, kl_penalty
from megatron_vlmr1.algo.policy_loss import clipped_surrogate, grpo_loss, importance_ratio, tis_weight
from megatron_vlmr1.algo.registry import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    Registry,
)
from megatron_vlmr1.algo.sampling import group_sample_indices, informative_groups
from megatron_vlmr1.config import load_object


def get_advantage_estimator(name: str) -> Callable[..., Any]:
    """``(rewards [N], config) -> advantages [N]`` registered as ``name`` or at ``package.module:function``."""
    return ADVANTAGE_ESTIMATORS.get(name)


def get_kl_estimator(name: str) -> Callable[..., Any]:
    """``(logprobs [B, T], ref_logprobs [B, T]) -> kl [B, T]``."""
    return KL_ESTIMATORS.get(name)


def get_loss_aggregation(name: str) -> Callable[..., Any]:
    """``(values [B, T], mask [B, T], config) -> (total [], count [])``."""
    return LOSS_AGGREGATIONS.get(name)


def get_policy_loss(name: str) -> Callable[..., Any]:
    """``(logprobs, old_logprobs, ref_logprobs, advantages, mask, config, *, rollout_logprobs, normalizer)
    -> (loss [], metrics)``."""
    return POLICY_LOSSES.get(name)


__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "AlgoConfig",
    "Registry",
    "aggregate",
    "broadcast_to_tokens",
    "check_groups",
    "clipped_surrogate",
    "get_advantage_estimator",
    "get_kl_estimator",
    "get_loss_aggregation",
    "get_policy_loss",
    "group_sample_indices",
    "grpo_advantages",
    "grpo_loss",
    "importance_ratio",
    "informative_groups",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "load_object",
    "loss_normalizer",
    "tis_weight",
]
