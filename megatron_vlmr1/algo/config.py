"""``AlgoConfig``: every knob of the RL objective, validated where it is declared."""
from __future__ import annotations

import dataclasses
from typing import Literal

from megatron_vlmr1.algo.registry import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    Registry,
)


@dataclasses.dataclass
class AlgoConfig:
    """The GRPO family of objectives; the defaults are VLM-R1's GRPO.

    DAPO: ``epsilon_high=0.28, beta=0, loss_agg="token-mean", dynamic_sampling=True``.
    Dr.GRPO: ``advantage_scale="none", loss_agg="seq-mean-token-sum-norm", max_response_length=<generation budget>``.
    """

    group_size: int = 8
    """G: completions sampled per prompt; advantages are relative to the group, so G >= 2."""
    advantage: str = "grpo"
    """advantage estimator: a registered name or ``package.module:function``."""
    advantage_scale: Literal["std", "none"] = "std"
    """"std" divides by the group's (unbiased) reward std; "none" only subtracts the mean (Dr.GRPO)."""
    advantage_eps: float = 1e-4
    """added to the group std before dividing (TRL / VLM-R1 use 1e-4)."""
    beta: float = 0.04
    """KL penalty weight; 0 switches the penalty off (no reference model is needed then)."""
    kl_estimator: str = "k3"
    """estimator of KL(pi || pi_ref) per token: k1, k2, k3 or ``package.module:function``."""
    epsilon_low: float = 0.2
    """ratio clip below: 1 - epsilon_low."""
    epsilon_high: float = 0.2
    """ratio clip above: 1 + epsilon_high (DAPO's clip-higher uses 0.28)."""
    dual_clip_c: float | None = None
    """dual-clip bound c > 1 on -A * ratio for negative advantages; None switches it off."""
    loss_agg: str = "seq-mean-token-mean"
    """loss aggregation: seq-mean-token-mean, token-mean, seq-mean-token-sum-norm or ``package.module:function``."""
    max_response_length: int | None = None
    """the constant length normaliser of seq-mean-token-sum-norm (the generation budget, Dr.GRPO's MAX_TOKENS)."""
    loss: str = "grpo"
    """policy loss: a registered name or ``package.module:function``."""
    mu: int = 1
    """optimizer updates per rollout batch (GRPO's mu); 1 is on-policy, where old log-probs equal the current ones."""
    tis_cap: float | None = None
    """truncated importance sampling: weight each token by min(pi_old / pi_rollout, tis_cap); None switches it off."""
    dynamic_sampling: bool = False
    """drop groups whose rewards are all equal (they carry no gradient) and sample more prompts (DAPO)."""
    dynamic_sampling_max_rounds: int = 4
    """with dynamic_sampling, the most generation rounds spent filling one batch before training on what there is."""
    shared_prefix: bool = True
    """training forward (update, old and reference log-probs) packs each group into one row: the prompt and its
    images are computed once per group, not once per completion (same log-probs and gradients to float32 rounding;
    false gives the per-row forward, e.g. to reproduce a run recorded with it bit for bit)."""

    def __post_init__(self) -> None:
        self._check_ranges()
        self._check_names()

    def _check_ranges(self) -> None:
        if self.group_size < 2:
            raise ValueError(
                f"algo.group_size must be >= 2 (got {self.group_size}): group-relative advantages compare "
                "completions of the same prompt, and one completion has no baseline"
            )
        if self.advantage_eps < 0:
            raise ValueError(f"algo.advantage_eps must be >= 0, got {self.advantage_eps}")
        if self.beta < 0:
            raise ValueError(f"algo.beta must be >= 0, got {self.beta}")
        if not 0 <= self.epsilon_low < 1:
            raise ValueError(f"algo.epsilon_low must be in [0, 1) so that 1 - epsilon_low > 0, got {self.epsilon_low}")
        if self.epsilon_high < 0:
            raise ValueError(f"algo.epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"algo.dual_clip_c must be > 1 (or null to switch it off), got {self.dual_clip_c}")
        if self.max_response_length is not None and self.max_response_length < 1:
            raise ValueError(f"algo.max_response_length must be >= 1, got {self.max_response_length}")
        if self.loss_agg == "seq-mean-token-sum-norm" and self.max_response_length is None:
            raise ValueError(
                "algo.max_response_length must be set when algo.loss_agg is 'seq-mean-token-sum-norm' "
                "(the constant normaliser; use the rollout's max new tokens)"
            )
        if self.mu < 1:
            raise ValueError(f"algo.mu must be >= 1, got {self.mu}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"algo.tis_cap must be > 0 (or null to switch it off), got {self.tis_cap}")
        if self.dynamic_sampling_max_rounds < 1:
            raise ValueError(f"algo.dynamic_sampling_max_rounds must be >= 1, got {self.dynamic_sampling_max_rounds}")

    def _check_names(self) -> None:
        for key, registry in (
            ("advantage", ADVANTAGE_ESTIMATORS),
            ("kl_estimator", KL_ESTIMATORS),
            ("loss_agg", LOSS_AGGREGATIONS),
            ("loss", POLICY_LOSSES),
        ):
            _check_name(f"algo.{key}", getattr(self, key), registry)


def _check_name(key: str, name: str, registry: Registry) -> None:
    try:
        registry.get(name)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None
