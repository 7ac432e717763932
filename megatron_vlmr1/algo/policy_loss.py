"""Policy losses: the clipped importance-ratio objective and the pieces it is made of.

A policy loss has the signature

    loss_fn(logprobs, old_logprobs, ref_logprobs, advantages, mask, config, *, rollout_logprobs=None,
            normalizer=None) -> (loss [], metrics: dict[str, float | Tensor])

with per-token tensors [B, T] (response tokens; ``mask`` 1 where a token counts), ``ref_logprobs`` None when
``config.beta == 0``, ``rollout_logprobs`` the rollout engine's log-probs (only needed for truncated importance
sampling) and ``normalizer`` the full batch's ``loss_normalizer`` when this call sees one micro-batch. A custom loss
takes the same arguments (``**kwargs`` is fine for the keywords it ignores) and is named in the config as
``package.module:function``. Metrics describe this call's tensors alone; the trainer averages them over
micro-batches.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from megatron_vlmr1.algo.aggregation import aggregate
from megatron_vlmr1.algo.kl import kl_penalty
from megatron_vlmr1.algo.registry import POLICY_LOSSES

if TYPE_CHECKING:
    from megatron_vlmr1.algo.config import AlgoConfig

LOG_RATIO_CLAMP = 20.0
"""Log importance ratios are clamped to +-20 before exp (as verl does): the ratio of a token whose log-prob moved
by more than 20 nats is clipped by the objective anyway, and exp must not overflow to inf (inf * 0 = nan)."""


class Surrogate(NamedTuple):
    """The clipped objective per token and where each clip is active (all [B, T])."""

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped_lower: torch.Tensor
    clipped_upper: torch.Tensor
    dual_clipped: torch.Tensor


def importance_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """pi_theta / pi_old per token, differentiable in ``logprobs`` only. [B, T] -> [B, T]."""
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_ratio)


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    dual_clip_c: float | None = None,
) -> Surrogate:
    """PPO's clipped objective as a per-token loss, with asymmetric bounds and optional dual clip.

    loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), the negated pessimistic bound (PPO eq. 7), so:
    A > 0 and r > 1 + eps_high, or A < 0 and r < 1 - eps_low, gives a constant loss, i.e. zero gradient (the
    policy already moved far enough that way). Separate eps_low / eps_high are DAPO's clip-higher: a larger
    eps_high lets unlikely tokens with positive advantage grow, which counters entropy collapse.

    Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games"): for A < 0 the max above is unbounded
    in r (-A r grows with r), so one off-policy token with a huge ratio can dominate; with c > 1 the loss
    becomes min(that, -A c) for A < 0, constant (zero gradient) once r > c.

    logprobs, old_logprobs, advantages: [B, T]. Returns ``Surrogate`` of [B, T] tensors.
    """
    ratio = importance_ratio(logprobs, old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = torch.maximum(unclipped, clipped)
    clipped_lower = (advantages < 0) & (ratio < 1.0 - epsilon_low)
    clipped_upper = (advantages > 0) & (ratio > 1.0 + epsilon_high)
    dual_clipped = torch.zeros_like(clipped_lower)
    if dual_clip_c is not None:
        bound = -advantages * dual_clip_c
        dual_clipped = (advantages < 0) & (bound < loss)
        loss = torch.where(dual_clipped, bound, loss)
    return Surrogate(loss, ratio, clipped_lower, clipped_upper, dual_clipped)


def tis_weight(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance-sampling weight min(pi_old / pi_rollout, cap), a constant (no gradient).

    The rollout engine (vLLM, other kernels, maybe lower precision) samples from pi_rollout, slightly different
    from the trainer's pi_old for the same weights; the surrogate assumes samples from pi_old. Re-weighting by
    pi_old / pi_rollout corrects that bias; truncating at ``cap`` bounds the variance (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"). [B, T] -> [B, T].
    """
    log_ratio = (old_logprobs - rollout_logprobs).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_ratio).clamp(max=cap)


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values [B, T] over mask [B, T] (0 for an empty mask), detached: for metrics. Returns []."""
    keep = mask.bool()
    total = torch.where(keep, values.detach().float(), 0.0).sum()
    return total / keep.sum().clamp(min=1)


def _check_shapes(**tensors: torch.Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"policy loss inputs must all be [B, T] of one shape (use broadcast_to_tokens for "
                         f"sequence-level advantages), got {shapes}")


@POLICY_LOSSES.register("grpo")
def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: AlgoConfig,
    *,
    rollout_logprobs: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
    """GRPO's objective: aggregate(w * clipped surrogate + beta * KL estimate) over the response tokens.

    w is the truncated importance-sampling weight when ``config.tis_cap`` is set (else 1); it corrects the sampling
    distribution of the policy-gradient term only, not the KL penalty (as verl does). The KL term is added per
    token before aggregation, as in the GRPO paper (verl aggregates it separately with the same mode: the same
    number, since aggregation is linear). The paper's (1/G) sum_i (1/|o_i|) sum_t is ``seq-mean-token-mean``, the
    default; ``token-mean`` (DAPO) and ``seq-mean-token-sum-norm`` (Dr.GRPO) are deliberate departures from it.

    All tensors [B, T]; returns the scalar loss [] and detached metrics over this call's response tokens:
    pg_loss and kl (the two terms, aggregated like the loss; kl is 0.0 when beta = 0), approx_kl (k3 estimate of
    KL(pi_old || pi_theta), 0 on the first update of a batch), ratio_mean / ratio_max, clip_frac_lower /
    clip_frac_upper / clip_frac (fraction of tokens whose gradient the ratio clip removed), dual_clip_frac, and
    with TIS tis_weight_mean / tis_truncated_frac.
    """
    _check_shapes(logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages,
                  mask=mask, rollout_logprobs=rollout_logprobs)
    surrogate = clipped_surrogate(
        logprobs, old_logprobs, advantages, config.epsilon_low, config.epsilon_high, config.dual_clip_c
    )
    metrics: dict[str, float | torch.Tensor] = {}
    pg = surrogate.loss
    if config.tis_cap is not None:
        if rollout_logprobs is None:
            raise ValueError(f"algo.tis_cap = {config.tis_cap} needs the rollout engine's log-probs, got None")
        weight = tis_weight(old_logprobs, rollout_logprobs, config.tis_cap)
        pg = pg * weight
        metrics["tis_weight_mean"] = masked_token_mean(weight, mask)
        metrics["tis_truncated_frac"] = masked_token_mean((weight >= config.tis_cap).float(), mask)
    kl = kl_penalty(logprobs, ref_logprobs, config)
    per_token = pg if kl is None else pg + config.beta * kl
    loss = aggregate(per_token, mask, config, normalizer)

    keep = mask.bool()
    ratio = surrogate.ratio.detach()
    metrics.update(
        pg_loss=aggregate(pg.detach(), mask, config),
        kl=aggregate(kl.detach(), mask, config) if kl is not None else 0.0,
        # pi_old sampled the tokens, so k3 with r = pi_theta / pi_old estimates KL(pi_old || pi_theta).
        approx_kl=masked_token_mean(ratio - 1 - ratio.log(), mask),
        ratio_mean=masked_token_mean(ratio, mask),
        ratio_max=torch.where(keep, ratio, 0.0).max(),  # ratios are > 0, so padding's 0 never wins
        clip_frac_lower=masked_token_mean(surrogate.clipped_lower.float(), mask),
        clip_frac_upper=masked_token_mean(surrogate.clipped_upper.float(), mask),
        clip_frac=masked_token_mean((surrogate.clipped_lower | surrogate.clipped_upper).float(), mask),
        dual_clip_frac=masked_token_mean(surrogate.dual_clipped.float(), mask),
    )
    return loss, metrics
