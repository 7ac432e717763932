"""Per-token estimators of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman, "Approximating KL
divergence", 2020).

With the log ratio ``d = ref_logprob - logprob`` (so the density ratio is ``r = exp(d) = pi_ref / pi_theta``):

- ``k1 = -d``: unbiased, high variance, can be negative per token.
- ``k2 = d**2 / 2``: biased, low variance, non-negative; its gradient is the gradient of the true KL's
  second-order expansion.
- ``k3 = exp(d) - d - 1 = (r - 1) - log r``: unbiased (E[r] = 1 under pi_theta), low variance, non-negative
  (convex in d with minimum 0 at d = 0). GRPO's choice.

Every estimator has the signature ``(logprobs [B, T], ref_logprobs [B, T]) -> kl [B, T]``; padding positions are
the aggregation's business (the mask), not the estimator's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_vlmr1.algo.registry import KL_ESTIMATORS

if TYPE_CHECKING:
    from megatron_vlmr1.algo.config import AlgoConfig

K3_LOG_RATIO_CLAMP = 20.0
"""|d| is clamped to 20 before exp in k3 so that exp(d) stays finite in fp32 and bf16."""
K3_MAX = 10.0
"""k3 is clamped to at most 10 per token (as verl's low_var_kl): a token the reference finds e^10 times likelier
would otherwise dominate the whole batch's penalty. Deviation from GRPO's paper, which does not clamp; the clamp
is inactive (identical value and gradient) whenever k3 <= 10, i.e. for d in about [-11, 2.61]."""


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi_theta - log pi_ref. [B, T] -> [B, T]."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi_theta - log pi_ref)**2 / 2. [B, T] -> [B, T]."""
    return 0.5 * (logprobs - ref_logprobs).square()


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(d) - d - 1 with d = log pi_ref - log pi_theta, clamped (see K3_LOG_RATIO_CLAMP, K3_MAX). [B, T]."""
    d = (ref_logprobs - logprobs).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1).clamp(max=K3_MAX)


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None, config: AlgoConfig
) -> torch.Tensor | None:
    """The per-token KL term of the loss via the configured estimator, or None when ``config.beta == 0``.

    beta = 0 returns None without touching ``ref_logprobs`` (the trainer then skips the reference forward).
    logprobs, ref_logprobs: [B, T]. Returns [B, T] (not yet multiplied by beta) or None.
    """
    if config.beta == 0:
        return None
    if ref_logprobs is None:
        raise ValueError(f"algo.beta = {config.beta} > 0 needs reference log-probs, got None")
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs {tuple(ref_logprobs.shape)} and logprobs {tuple(logprobs.shape)} differ")
    return KL_ESTIMATORS.get(config.kl_estimator)(logprobs, ref_logprobs)
