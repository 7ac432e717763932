"""Loss aggregation: per-token values [B, T] + response mask -> one scalar, micro-batch exact.

Every mode is a ratio ``total / count`` where both are sums over sequences: ``total`` sums a per-sequence quantity
that depends on that sequence alone, ``count`` counts sequences or tokens. The trainer splits a batch into
micro-batches and adds up their losses (gradient accumulation, and again across data-parallel ranks), so:

    sum_k total_k / count_full == total_full / count_full

holds exactly when each micro-batch divides by the *full batch's* count. Pass that count as ``normalizer``
(``loss_normalizer`` of the full mask, or the all-reduced sum of the micro-batches' ``loss_normalizer`` values,
which is additive). Dividing each micro-batch by its own count instead would weight a sequence by the size of
the micro-batch it landed in.

If the framework rescales losses itself, undo that in the normaliser: megatron's schedule divides a 2-tuple
``loss_func`` result by ``num_microbatches`` and its DDP averages gradients over the data-parallel ranks, so
there pass ``normalizer = global_count / (num_microbatches * dp_size)`` (global_count all-reduced with SUM).

Registered modes, signature ``(values [B, T], mask [B, T], config) -> (total [], count [])`` (count must depend on
the mask only). With L_i the number of response tokens of sequence i and S the number of non-empty sequences:

- ``seq-mean-token-mean`` (GRPO, VLM-R1): (1/S) sum_i (1/L_i) sum_t v_it. Each sequence weighs the same, so a
  long wrong answer is penalised per token less than a short one (the length bias Dr.GRPO points out).
- ``token-mean`` (DAPO): sum_it v_it / sum_i L_i. Each token weighs the same.
- ``seq-mean-token-sum-norm`` (Dr.GRPO): (1/S) sum_i (1/L_max) sum_t v_it with the constant
  L_max = ``config.max_response_length`` (the generation budget, Dr.GRPO's MAX_TOKENS). We take it from the config
  rather than from the padded width of the tensor (verl's default) so the value does not depend on how a
  micro-batch happens to be padded.

Rows with no response token (padding rows) contribute nothing and are not counted in S.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_vlmr1.algo.registry import LOSS_AGGREGATIONS

if TYPE_CHECKING:
    from megatron_vlmr1.algo.config import AlgoConfig


def _masked_row_sums(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of values over the mask, and token counts. [B, T] -> ([B], [B]).

    ``where`` rather than ``values * mask`` so that inf/nan at padding positions cannot leak into the sum.
    """
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"expected values and mask of the same [B, T] shape, got {tuple(values.shape)} and "
                         f"{tuple(mask.shape)}")
    keep = mask.bool()
    row_sums = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dim=-1)
    return row_sums, keep.sum(dim=-1).to(values.dtype)


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(
    values: torch.Tensor, mask: torch.Tensor, config: AlgoConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over sequences of the per-sequence token mean, number of non-empty sequences). [B, T] -> ([], [])."""
    row_sums, lengths = _masked_row_sums(values, mask)
    nonempty = lengths > 0
    return (row_sums / lengths.clamp(min=1)).sum(), nonempty.sum().to(values.dtype)


@LOSS_AGGREGATIONS.register("token-mean")
def token_mean(values: torch.Tensor, mask: torch.Tensor, config: AlgoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over all response tokens, number of response tokens). [B, T] -> ([], [])."""
    row_sums, lengths = _masked_row_sums(values, mask)
    return row_sums.sum(), lengths.sum()


@LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(
    values: torch.Tensor, mask: torch.Tensor, config: AlgoConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over tokens / max_response_length, number of non-empty sequences). [B, T] -> ([], [])."""
    if config.max_response_length is None:
        raise ValueError("loss aggregation 'seq-mean-token-sum-norm' needs algo.max_response_length")
    row_sums, lengths = _masked_row_sums(values, mask)
    return row_sums.sum() / config.max_response_length, (lengths > 0).sum().to(values.dtype)


def loss_normalizer(mask: torch.Tensor, config: AlgoConfig) -> torch.Tensor:
    """The count the configured aggregation divides by, for this mask [B, T]. Returns a float32 scalar [].

    Additive over sequences: the count of a batch is the sum of the counts of its micro-batches (and of the
    data-parallel ranks' batches), so compute it per micro-batch and add (or all-reduce with SUM).
    """
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return LOSS_AGGREGATIONS.get(config.loss_agg)(zeros, mask, config)[1]


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    config: AlgoConfig,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-token values [B, T] over the response mask [B, T] to a scalar [] with ``config.loss_agg``.

    ``normalizer``: the full batch's ``loss_normalizer`` when ``values`` is one micro-batch of it (then the
    micro-batch results sum to the full-batch result); None divides by this tensor's own count (a lone batch).
    An empty mask gives 0.
    """
    total, count = LOSS_AGGREGATIONS.get(config.loss_agg)(values, mask, config)
    denominator = count if normalizer is None else torch.as_tensor(normalizer, dtype=total.dtype, device=total.device)
    # A zero count means nothing was counted (total is 0 too): return 0 rather than 0 / 0. The normaliser may be
    # fractional (see the module docstring), so it is not clamped to 1.
    return total / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
