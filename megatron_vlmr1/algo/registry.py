"""Named registries for the RL math: one registry per kind, one call signature per registry.

The trainer never branches on algorithm names: it asks a registry for the function a config names. Built-ins
register themselves by decorator when ``megatron_vlmr1.algo`` is imported; a user's own function needs no
registration at all, a config can name it as ``package.module:function``.

Signatures (see each module for the tensor shapes):

- advantage estimator: ``(rewards [N], config) -> advantages [N]``
- KL estimator: ``(logprobs [B, T], ref_logprobs [B, T]) -> kl [B, T]``
- loss aggregation: ``(values [B, T], mask [B, T], config) -> (total [], count [])``
- policy loss: ``(logprobs, old_logprobs, ref_logprobs, advantages, mask, config, *, rollout_logprobs, normalizer)
  -> (loss [], metrics)``
"""
from __future__ import annotations

from megatron_vlmr1.registry import Registry

ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")
KL_ESTIMATORS: Registry = Registry("KL estimator")
LOSS_AGGREGATIONS: Registry = Registry("loss aggregation")
POLICY_LOSSES: Registry = Registry("policy loss")
